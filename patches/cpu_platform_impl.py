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

    def get_kv_pool_cls(self, *, kind):
        """With a2ats offload on, the MHA pool lives in shared host memory (for the CPU worker)."""
        from a2ats_sglang.config import A2ATSConfig

        if kind == "mha" and A2ATSConfig.from_env().offload:
            from a2ats_sglang.host_pool import HostKVPool

            return HostKVPool
        return None
