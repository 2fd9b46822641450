"""The LLMDiff training script's parts (DESIGN.md §1.3), one job per module.

options          flags + YAML -> TrainOptions
comfy_env        making ComfyUI importable (before anything imports comfy)
sources          dataset formats (folder, JSONL/CSV manifest, .tar shards) -> entries
data             the per-process sample stream: order, decoding, resume position
imaging          decode, resize, crop
buckets          aspect-ratio bucket sizes and the nearest one to an image
encoders         the frozen VAE / LLM / CLIP turned into training inputs
feature_cache    the optional pre-pass storing latents and LLM features in shards
stored_tensor    a cached tensor's place in its shard, read straight into the batch buffer
objective        noise, timesteps, the loss (epsilon / v, min-SNR)
schedule         learning-rate schedule
ema              exponential moving average of the adapter
patching         the adapter in the U-Net, through the same patch code as the nodes
sdpa_backends    the attention kernels the U-Net and the adapter may use (--sdpa-backends)
float8_linears   the frozen U-Net's linear layers as float8 GEMMs (--unet-fp8)
checkpointing    atomic checkpoints, resume, keep-last-N, the exported adapter file
tracking         progress bar, JSONL log, TensorBoard
previews         validation images through ComfyUI's sampler
prefetch         batches prepared in background threads while the step runs
device_copy      a batch's copy to the GPU, on a stream of its own
loop             the training loop
runner           loads everything and runs
cli              `python llmdiff_core/train.py` entry point

Only options, sources, data, imaging, buckets, schedule, ema, stored_tensor, prefetch and device_copy import without
ComfyUI; the rest import comfy (run comfy_env.setup() first, as cli.main does).
"""
