"""The peer benchmark.py --peer runs: diffusers' StableAudioPipeline (PyTorch, CUDA) with
random weights at Stable Audio Open 1.0's shapes, 100 steps, cfg 7, a 47 s window, its
DiT eager or under torch.compile (--torch-compile MODE).

It needs torch, transformers and diffusers, which stable-audio-mlx does not: it is for
a CUDA machine that has them. By default it prints one JSON line: the first generation
(a 2-step warm-up: with torch.compile, its compilation), the end-to-end time (T5,
sampling, decoding; median of --runs after it), one guided DiT forward (batch 2), one
VAE decode and the peak memory (GiB, PyTorch's allocator). --save FOLDER writes the
random pipeline as diffusers' files; --one-shot FOLDER --output FILE is what a person
runs once: load, generate from a prompt, write a .wav (benchmark.py --whole-process
times that process from start to end)."""

import argparse
import json
import statistics
import time
from pathlib import Path

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
from transformers import T5Config, T5EncoderModel, T5TokenizerFast

COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune-no-cudagraphs")
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


def compiled(pipe, mode: str):
    """`pipe` with its DiT under torch.compile(mode=`mode`) ("off": eager)."""
    if mode != "off":
        pipe.transformer.compile(mode=mode)
    return pipe


def window_seconds(pipe) -> float:
    """The model's whole window (47.55 s), as txt2audio.py makes by default."""
    samples = pipe.transformer.config.sample_size * pipe.vae.hop_length
    return samples / pipe.vae.sampling_rate


def end_to_end(pipe, steps: int, runs: int, device: str = "cuda") -> tuple:
    """The seconds of a first 2-step generation, the median seconds of `runs`
    generations (47 s, cfg 7) and their peak GiB."""
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

    first = cuda_seconds(lambda: generate(2), 1, warm_up=False)
    torch.cuda.reset_peak_memory_stats()
    times = [
        cuda_seconds(lambda: generate(steps), 1, warm_up=False) for _ in range(runs)
    ]
    return first, statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


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
    rope = tuple(r.to(device) for r in rope)  # as the pipeline passes them
    conditioning = dict(
        encoder_hidden_states=context,
        global_hidden_states=global_embed,
        rotary_embedding=rope,
    )
    forward = cuda_seconds(lambda: dit(x, t, **conditioning), 10)
    return forward, cuda_seconds(lambda: pipe.vae.decode(x[:1]), 3)


def save(folder: Path, spiece: Path):
    """The random pipeline (float32 weights) as diffusers' files, with a T5 tokenizer
    made from the SentencePiece model `spiece`."""
    pipe = pipeline(torch.float32, device="cpu")
    tokenizer = T5TokenizerFast(vocab_file=str(spiece), model_max_length=128)
    pipe.register_modules(tokenizer=tokenizer)
    pipe.save_pretrained(folder)


@torch.no_grad()
def one_shot(folder: Path, output: Path, dtype, mode: str, steps: int):
    """What a person runs once: load the pipeline, generate the whole window from a
    prompt (cfg 7, seed 0), write 16-bit PCM."""
    import soundfile as sf

    pipe = StableAudioPipeline.from_pretrained(folder, dtype=dtype).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    audio = compiled(pipe, mode)(
        "128 BPM tech house drum loop",
        audio_end_in_s=window_seconds(pipe),
        num_inference_steps=steps,
        guidance_scale=7.0,
        generator=torch.Generator("cuda").manual_seed(0),
        output_type="np",
    ).audios[0]
    sf.write(output, audio.T, pipe.vae.sampling_rate, subtype="PCM_16")


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
    parser.add_argument(
        "--torch-compile",
        choices=COMPILE_MODES,
        default="off",
        help="torch.compile the DiT in this mode (default: off, eager)",
    )
    parser.add_argument(
        "--save",
        type=Path,
        metavar="FOLDER",
        help="write the random pipeline there (with --spiece) and exit",
    )
    parser.add_argument("--spiece", type=Path, help="the tokenizer's spiece.model")
    parser.add_argument(
        "--one-shot",
        type=Path,
        metavar="FOLDER",
        help="load a --save folder, generate once, write --output, exit",
    )
    parser.add_argument("--output", type=Path, default=Path("peer.wav"))
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    # PyTorch's default is true float32; stable-audio-tools also turns TF32 off to
    # generate
    tf32 = args.dtype == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    if args.save:
        return save(args.save, args.spiece)
    if args.one_shot:
        return one_shot(
            args.one_shot, args.output, dtype, args.torch_compile, args.steps
        )
    pipe = compiled(pipeline(dtype), args.torch_compile)
    first, seconds, peak = end_to_end(pipe, args.steps, args.runs)
    forward, decode = forward_and_decode(pipe, dtype)
    result = {
        "dtype": args.dtype,
        "torch_compile": args.torch_compile,
        "torch": torch.__version__,
        "first_generation_s": first,
        "end_to_end_s": seconds,
        "dit_forward_s": forward,
        "decode_s": decode,
        "peak_GiB": peak,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
