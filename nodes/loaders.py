"""Loader nodes: the LLM (Hugging Face folder under models/LLM) and the adapter file."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..llmdiff_core import paths
from ..llmdiff_core.comfy_adapter import ADAPTER_DTYPES, load_for_inference
from ..llmdiff_core.comfy_llm import AFTER_ENCODING, load_managed_llm
from .sockets import ADAPTER, CATEGORY, LLM


class LLMDiffLLMLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LLMDiffLLMLoader",
            display_name="LLM Loader (LLMDiff)",
            category=CATEGORY,
            description="Loads a decoder-only LLM from a Hugging Face folder under models/LLM/ "
                        "(local files only, safetensors weights).",
            inputs=[
                io.Combo.Input("model_dir", options=paths.list_llm_folders(),
                               tooltip="A Hugging Face model folder (config.json, tokenizer, *.safetensors) "
                                       "under models/LLM/."),
                io.Combo.Input("dtype", options=["auto", "bf16", "fp16", "fp32"], default="auto",
                               tooltip="auto: bf16 where the GPU supports it, else fp16 on GPUs; fp32 on CPU."),
                io.Combo.Input("device", options=["default", "cpu"], default="default",
                               tooltip="default: encode on ComfyUI's GPU; cpu: load and encode on the CPU."),
                io.Boolean.Input("trust_remote_code", default=False,
                                 tooltip="Run Python code shipped inside the model folder. Only for folders "
                                         "you trust; needed only for architectures transformers lacks."),
                io.Combo.Input("after_encoding", options=list(AFTER_ENCODING), default="offload", optional=True,
                               tooltip="offload: the LLM leaves the GPU right after each encode, so it never "
                                       "shares it with the U-Net (lowest peak; a changed prompt loads it again, "
                                       "seconds for an 8B). keep: ComfyUI keeps it loaded until something needs "
                                       "the room (faster prompt edits on a large card)."),
            ],
            outputs=[LLM.Output(display_name="llm")],
        )

    @classmethod
    def execute(cls, model_dir: str, dtype: str, device: str, trust_remote_code: bool,
                after_encoding: str = "offload") -> io.NodeOutput:
        path = paths.llm_folder_path(model_dir)
        return io.NodeOutput(load_managed_llm(path, model_dir, dtype=dtype, device=device,
                                              trust_remote_code=trust_remote_code, after_encoding=after_encoding))


class LLMDiffAdapterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LLMDiffAdapterLoader",
            display_name="Adapter Loader (LLMDiff)",
            category=CATEGORY,
            description="Loads an LLMDiff adapter (.safetensors with its config in the metadata) from models/llmdiff/.",
            inputs=[
                io.Combo.Input("adapter_name", options=paths.list_adapters(),
                               tooltip="An LLMDiff adapter .safetensors under models/llmdiff/. It knows which "
                                       "base model and LLM it was trained for."),
                io.Combo.Input("dtype", options=list(ADAPTER_DTYPES), default="auto", optional=True,
                               tooltip="Precision of the adapter's projections (nearly all of its weights). auto: "
                                       "what ComfyUI runs the U-Net in on this machine (fp16 on most GPUs: half "
                                       "the memory of the float32 training export; fp32 on CPU). The gates and "
                                       "the text-feature math stay float32."),
            ],
            outputs=[ADAPTER.Output(display_name="adapter")],
        )

    @classmethod
    def execute(cls, adapter_name: str, dtype: str = "auto") -> io.NodeOutput:
        return io.NodeOutput(load_for_inference(paths.adapter_path(adapter_name), dtype))
