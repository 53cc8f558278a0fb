"""varray's sampler against the official VAR code on the same random weights.

The official code is a checkout of FoundationVision/VAR that this script is pointed at (never
vendored). Both sides get the same weights: the official VAR built by its own `build_vae_var`
(depth 8 -> width 512, heads 8, the official 10 scales), its init plus seeded noise so attention
and AdaLN matter, and the official 256 px tokenizer config with PyTorch's default random init.
varray loads the same state dicts through `load_official_var` / `load_official_tokenizer`.

1. Same images: both draw from one torch generator seeded the same way (official g_seed, varray
   seeds=int), so with equal logits they draw the same tokens. The official tokens are recorded by
   wrapping its sample_with_top_k_top_p_; the images' max difference is reported.
2. Speed, interleaved (the order alternates every run): tokens only and with decoding, at each
   batch size, CPU time of the process and wall time, min and median over the runs. The ratio is
   official / varray (CPU time on a CPU, wall time on a GPU).

    python benchmarks/vs_official.py --official-src /tmp/official_var [--runs 3 --batches 1,8]

Prints one JSON line last on stdout.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import types

import torch
from options import options
from timing import measure
from torch import nn

from var_model import SamplingSettings, load_official_tokenizer, load_official_var
from var_model.generation import generate, sample_token_maps

SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def import_official(src: str):
    """`models` from the official checkout, with its construction-time side effects undone."""
    if not os.path.isfile(os.path.join(src, "models", "var.py")):
        raise SystemExit(f"--official-src: {src} has no models/var.py (a FoundationVision/VAR checkout)")
    if "huggingface_hub" not in sys.modules:
        try:
            import huggingface_hub  # noqa: F401
        except ImportError:
            # Only the VARHF class (push to / load from the Hub) uses it; VAR and VQVAE do not.
            stub = types.ModuleType("huggingface_hub")
            stub.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})
            sys.modules["huggingface_hub"] = stub
    sys.path.insert(0, os.path.abspath(src))
    import models  # noqa: E402  (the official package)
    import models.var  # noqa: E402
    return models


def build_official(models, device: torch.device, depth: int, seed: int):
    """Official VQVAE + VAR with random weights; restores the reset_parameters it disables."""
    classes = (nn.Linear, nn.LayerNorm, nn.BatchNorm2d, nn.SyncBatchNorm, nn.Conv1d, nn.Conv2d,
               nn.ConvTranspose1d, nn.ConvTranspose2d)
    saved = {cls: cls.__dict__.get("reset_parameters") for cls in classes}
    torch.manual_seed(seed)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # its construction log; stdout is the JSON line
            vae, var = models.build_vae_var(device=device, patch_nums=SCALES, depth=depth, shared_aln=False,
                                            attn_l2_norm=True, flash_if_available=False, fused_if_available=False)
    finally:
        for cls, method in saved.items():
            if method is not None:
                setattr(cls, "reset_parameters", method)
            else:  # inherited (Conv2d's is _ConvNd's): drop the override so the base one shows again
                delattr(cls, "reset_parameters")
    with torch.no_grad():
        # build_vae_var leaves the VAE uninitialised (it expects a checkpoint): default PyTorch init.
        for module in vae.modules():
            if hasattr(module, "reset_parameters") and module is not vae:
                module.reset_parameters()
        vae.quantize.embedding.weight.uniform_(-0.5, 0.5)
        # Official VAR init has near-zero residual gates; noise makes every block count.
        for name, param in var.named_parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return vae.eval(), var.eval()


def summary(samples: list[float]) -> dict[str, float]:
    return {"min": round(min(samples), 4), "median": round(statistics.median(samples), 4)}


def main() -> None:
    args = options(
        __doc__.split("\n\n")[0], official_src=(str, "a checkout of github.com/FoundationVision/VAR"),
        depth=(8, "official build_vae_var depth (width = 64 * depth)"), batches="1,8",
        modes=("tokens,decode", "tokens (sampling only), decode (with images)"),
        runs=(3, "timed runs per side, interleaved"), cfg=1.5, top_k=900, top_p=0.96, seed=0,
        check_batch=(2, "batch of the same-images check"), device="cpu",
        threads=(1, "CPU threads (0: leave torch's default)"),
        fast_decoder=("on", "on|off: varray's tokenizer decoder fast path (VQVAE.prepare_for_inference)"))
    if args.fast_decoder not in ("on", "off"):
        raise SystemExit(f"--fast-decoder: on or off (got {args.fast_decoder!r})")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = import_official(args.official_src)
    official_vae, official_var = build_official(models, device, args.depth, args.seed)
    tokenizer = load_official_tokenizer(official_vae.state_dict()).to(device)
    var = load_official_var(official_var.state_dict()).to(device)
    if args.fast_decoder == "on":
        tokenizer.prepare_for_inference()
    sampling = SamplingSettings(args.cfg, args.top_k, args.top_p)
    official_sampling = {"cfg": sampling.cfg, "top_k": sampling.top_k, "top_p": sampling.top_p}  # its arguments
    num_classes = var.config.num_classes

    def labels_for(batch: int) -> torch.Tensor:
        return (torch.arange(batch, device=device) * 97 + 3) % num_classes

    def official_images(batch: int) -> torch.Tensor:
        return official_var.autoregressive_infer_cfg(batch, labels_for(batch), g_seed=args.seed, **official_sampling)

    def official_tokens(batch: int) -> None:
        # The official sampler always decodes; for tokens only, its decoder step returns f_hat as is.
        official_vae.fhat_to_img = lambda f_hat: f_hat
        try:
            official_var.autoregressive_infer_cfg(batch, labels_for(batch), g_seed=args.seed, **official_sampling)
        finally:
            del official_vae.fhat_to_img

    def varray_images(batch: int) -> torch.Tensor:
        return generate(var, tokenizer, labels_for(batch), seeds=args.seed, **sampling.as_kwargs())

    def varray_tokens(batch: int) -> None:
        sample_token_maps(var, tokenizer, labels_for(batch), sampling, seeds=args.seed)

    # ---- 1. same images ---------------------------------------------------------------------
    recorded: list[torch.Tensor] = []
    original_sampler = models.var.sample_with_top_k_top_p_

    def recording_sampler(*a, **k):
        out = original_sampler(*a, **k)
        recorded.append(out[:, :, 0].clone())
        return out

    models.var.sample_with_top_k_top_p_ = recording_sampler
    try:
        theirs = official_images(args.check_batch)
    finally:
        models.var.sample_with_top_k_top_p_ = original_sampler
    ours = varray_images(args.check_batch)
    same_tokens = sum(int((a.flatten(1) == b.flatten(1)).sum()) for a, b in zip(recorded, ours.token_maps))
    total_tokens = sum(a.numel() for a in recorded)
    image_difference = float((theirs - ours.images).abs().max())
    print(f"check: batch {args.check_batch}, tokens equal {same_tokens}/{total_tokens}, "
          f"images max |diff| {image_difference:.3g}", file=sys.stderr)

    # ---- 2. speed, interleaved ---------------------------------------------------------------
    sides = {"tokens": (official_tokens, varray_tokens), "decode": (official_images, varray_images)}
    figures = {}
    on_cpu = device.type == "cpu"
    for mode in args.modes.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            official_fn, varray_fn = sides[mode]
            official_fn(batch), varray_fn(batch)  # warm-up
            samples = {"official": ([], []), "varray": ([], [])}
            for run in range(args.runs):
                order = [("official", official_fn), ("varray", varray_fn)]
                for name, fn in (order if run % 2 == 0 else order[::-1]):
                    wall, cpu = measure(lambda: fn(batch), device)
                    samples[name][0].append(wall)
                    samples[name][1].append(cpu)
            entry = {}
            for name, (walls, cpus) in samples.items():
                entry[name] = {"wall_s": summary(walls), "cpu_s": summary(cpus)}
            basis = 1 if on_cpu else 0
            for stat in ("min", "median"):
                pick = (statistics.median if stat == "median" else min)
                entry[f"ratio_{stat}"] = round(pick(samples["official"][basis]) / pick(samples["varray"][basis]), 3)
            figures[f"{mode}_b{batch}"] = entry
            print(f"{mode} batch {batch}: {json.dumps(entry)}", file=sys.stderr)

    print(json.dumps({
        "benchmark": "vs_official",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "depth": args.depth, "width": var.config.hidden_size, "heads": var.config.num_heads,
        "scales": list(SCALES), "image_size": tokenizer.config.image_size,
        "cfg": args.cfg, "top_k": args.top_k, "top_p": args.top_p, "runs": args.runs,
        "fast_decoder": args.fast_decoder,
        "check": {"batch": args.check_batch, "tokens_equal": same_tokens, "tokens": total_tokens,
                  "images_max_abs_diff": image_difference},
        "ratio_basis": "cpu_time" if on_cpu else "wall_time",
        "figures": figures,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }))


if __name__ == "__main__":
    main()
