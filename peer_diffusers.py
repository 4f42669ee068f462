"""The peer benchmark.py --peer runs: diffusers' StableAudioPipeline (PyTorch, CUDA) with
random weights at Stable Audio Open 1.0's shapes, 100 steps, cfg 7, a 47 s window.

It needs torch, transformers and diffusers, which stable-audio-mlx does not: it is for
a CUDA machine that has them. Prints one JSON line: the end-to-end time (T5, sampling,
decoding; median of --runs after a warm-up), one guided DiT forward (batch 2), one VAE
decode and the peak memory (GiB, PyTorch's allocator)."""

import argparse
import json
import statistics
import time

import torch
from diffusers import (
    AutoencoderOobleck,
    CosineDPMSolverMultistepScheduler,
    StableAudioDiTModel,
    StableAudioPipeline,
)
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from diffusers.pipelines.stable_audio.modeling_stable_audio import (
    StableAudioProjectionModel,
)
from transformers import T5Config, T5EncoderModel

DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "tf32": torch.float32,
}


def cuda_seconds(fn, repeats: int, warm_up: bool = True) -> float:
    if warm_up:
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def pipeline(dtype, device: str = "cuda"):
    """diffusers' StableAudioPipeline at Stable Audio Open 1.0's shapes (its defaults),
    random weights, with a T5-base of random weights."""
    torch.manual_seed(0)
    dit = StableAudioDiTModel().to(device, dtype).eval()
    vae = AutoencoderOobleck().to(device, dtype).eval()
    projection = StableAudioProjectionModel(
        text_encoder_dim=768, conditioning_dim=768, min_value=0, max_value=512
    ).to(device, dtype)
    t5_config = T5Config(
        d_model=768, d_ff=3072, num_layers=12, num_heads=12, d_kv=64, vocab_size=32128
    )
    t5 = T5EncoderModel(t5_config).to(device, dtype).eval()
    scheduler = CosineDPMSolverMultistepScheduler(
        sigma_min=0.3,
        sigma_max=500,
        solver_order=2,
        prediction_type="v_prediction",
        sigma_data=1.0,
        sigma_schedule="exponential",
    )
    pipe = StableAudioPipeline(
        vae=vae,
        text_encoder=t5,
        projection_model=projection,
        tokenizer=None,
        transformer=dit,
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def end_to_end(pipe, steps: int, runs: int, device: str = "cuda") -> tuple:
    """The median seconds of `runs` generations (47 s, cfg 7) and their peak GiB."""
    tokens = torch.randint(0, 32000, (1, 128), device=device)
    mask = (torch.arange(128, device=device) < 20).long()[None]

    @torch.no_grad()
    def generate(steps):
        text = pipe.text_encoder(tokens, attention_mask=mask)[0]
        return pipe(
            prompt_embeds=text,
            negative_prompt_embeds=torch.zeros_like(text),
            attention_mask=mask,
            negative_attention_mask=mask,
            audio_end_in_s=47.0,
            num_inference_steps=steps,
            guidance_scale=7.0,
            generator=torch.Generator(device).manual_seed(0),
            output_type="pt",
        ).audios

    generate(2)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = [
        cuda_seconds(lambda: generate(steps), 1, warm_up=False) for _ in range(runs)
    ]
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


@torch.no_grad()
def forward_and_decode(pipe, dtype, device: str = "cuda") -> tuple:
    """Seconds of one DiT forward (a guided batch of 2, 1024 latents) and one decode."""
    dit, latents = pipe.transformer, 1024
    x = torch.randn(2, 64, latents, device=device, dtype=dtype)
    t = torch.full((2,), 0.5, device=device, dtype=dtype)
    context = torch.randn(2, 130, 768, device=device, dtype=dtype)
    global_embed = torch.randn(2, 1, 1536, device=device, dtype=dtype)
    rope = get_1d_rotary_pos_embed(
        dit.config.attention_head_dim // 2,
        latents + 1,
        use_real=True,
        repeat_interleave_real=False,
    )
    conditioning = dict(
        encoder_hidden_states=context,
        global_hidden_states=global_embed,
        rotary_embedding=rope,
    )
    forward = cuda_seconds(lambda: dit(x, t, **conditioning), 10)
    return forward, cuda_seconds(lambda: pipe.vae.decode(x[:1]), 3)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float16",
        help="tf32: float32 weights, TF32 matmuls and convolutions (default: float16)",
    )
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    # PyTorch's default is true float32; stable-audio-tools also turns TF32 off to
    # generate
    tf32 = args.dtype == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    pipe = pipeline(dtype)
    seconds, peak = end_to_end(pipe, args.steps, args.runs)
    forward, decode = forward_and_decode(pipe, dtype)
    result = {
        "dtype": args.dtype,
        "torch": torch.__version__,
        "end_to_end_s": seconds,
        "dit_forward_s": forward,
        "decode_s": decode,
        "peak_GiB": peak,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
