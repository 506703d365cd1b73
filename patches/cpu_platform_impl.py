"""The platform class behind ``SGLANG_PLATFORM=a2ats_cpu`` (imported only when selected)."""

from sglang.srt.platforms.cpu import CpuDeviceMixin
from sglang.srt.platforms.device_mixin import PlatformEnum
from sglang.srt.platforms.interface import SRTPlatform


class A2ATSCpuPlatform(CpuDeviceMixin, SRTPlatform):
    """CPU device operations as an out-of-tree platform: no pinned memory, no graphs."""

    _enum = PlatformEnum.OOT

    def is_pin_memory_available(self, device=None) -> bool:
        return False

    def get_default_attention_backend(self) -> str:
        return "torch_native"
