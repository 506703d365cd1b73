"""The platform class behind ``SGLANG_PLATFORM=a2ats_cpu`` (imported only when selected)."""

from sglang.srt.platforms.cpu import CpuDeviceMixin
from sglang.srt.platforms.device_mixin import PlatformEnum
from sglang.srt.platforms.interface import PlatformCapabilities, SRTPlatform


class A2ATSCpuPlatform(CpuDeviceMixin, SRTPlatform):
    """CPU device operations as an out-of-tree platform: no pinned memory; SGLang's CPU
    graph runner (``--enable-torch-compile``), falling back to eager decode where a
    configuration cannot be captured (:mod:`.cpu_graph_runner`); with ``A2ATS_CPU_LINEAR=packed``,
    float32 linear layers with their weights packed once by oneDNN (:mod:`.cpu_linear`)."""

    _enum = PlatformEnum.OOT
    capabilities = PlatformCapabilities(graph_capture=True)

    def get_graph_runner_cls(self):
        from a2ats_sglang.patches.cpu_graph_runner import EagerFallbackCPUGraphRunner

        return EagerFallbackCPUGraphRunner

    def post_load_model(self, model) -> None:
        from a2ats_sglang.patches.cpu_linear import pack_model

        pack_model(model)

    def is_pin_memory_available(self, device=None) -> bool:
        return False

    def get_default_attention_backend(self) -> str:
        return "torch_native"
