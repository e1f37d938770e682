"""`edge`: a thin Typer app. Parse, call edge.api, print. No logic lives here."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from edge.errors import EdgeError

app = typer.Typer(
    name="edge",
    help="Take small Gemma models to phones, Raspberry Pis and laptops, and prove they are still Gemma.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Options shared by several commands, declared once.
VariantOpt = Annotated[str, typer.Option("--variant", "-v", help="Variant name or alias (`edge variants`).")]
WeightsOpt = Annotated[
    Path | None, typer.Option("--weights", help="A .gguf file or a Hugging Face folder (config.json + *.safetensors).")
]
RandomOpt = Annotated[bool, typer.Option("--random-weights", help="Seeded random weights (structure and size tests).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for --random-weights and for sampling.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else there.")]
NoCacheOpt = Annotated[
    bool, typer.Option("--no-cache", help="Quantize afresh: neither read nor write the quantization cache.")
]


def _print_json(obj: object) -> None:
    from edge.jsonout import dumps

    sys.stdout.write(dumps(obj) + "\n")


@app.command()
def variants(as_json: JsonOpt = False) -> None:
    """List the known Gemma variants, their sizes and where their weights come from."""
    from edge import api

    rows = api.variants()
    if as_json:
        _print_json({"variants": rows})
        return
    gb = lambda b: f"{b / 1e9:.2f} GB" if b >= 1e9 else f"{b / 1e6:.0f} MB"
    head = f"{'name':<13} {'aliases':<10} {'family':<7} {'params':>7} {'fp32':>9} {'int8':>9} {'int4':>9}  weights"
    typer.echo(head)
    for r in rows:
        s = r["size_bytes"]
        typer.echo(
            f"{r['name']:<13} {','.join(r['aliases']):<10} {r['family']:<7} {r['parameters'] / 1e6:>6.0f}M "
            f"{gb(s['fp32']):>9} {gb(s['int8']):>9} {gb(s['int4']):>9}  {r['weight_source']}"
        )
    typer.echo(
        "(estimates: int8 8.5 bits per weight; int4 an int8 table and linears averaging 6.7 bits, the 270M's mix)"
    )


@app.command()
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt text.")],
    variant: VariantOpt = "gemma3-270m",
    weights: WeightsOpt = None,
    random_weights: RandomOpt = False,
    seed: SeedOpt = 0,
    bundle: Annotated[Path | None, typer.Option("--bundle", help="Run an exported bundle instead.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate at most.")] = 64,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in Gemma's chat template.")] = False,
    temperature: Annotated[float, typer.Option("--temperature", help="0 is greedy.")] = 0.0,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Sample from the k most likely tokens.")] = None,
    max_seq_len: Annotated[int, typer.Option("--max-seq-len", help="KV cache length (prompt + output).")] = 1024,
    as_json: JsonOpt = False,
) -> None:
    """Generate text, streamed to the terminal (greedy by default)."""
    from edge import api
    from edge.generation import SamplingConfig
    from edge.paths import utf8_text

    utf8_text(prompt, "--prompt")  # before the weights load

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = api.generate(
        prompt,
        variant=variant,
        weights=weights,
        random_weights=random_weights,
        seed=seed,
        max_new_tokens=max_new_tokens,
        chat=chat,
        sampling=SamplingConfig(temperature, top_k, seed),
        max_seq_len=max_seq_len,
        bundle=bundle,
        on_text=None if as_json else stream,
    )
    if as_json:
        _print_json(result.to_json())
        return
    sys.stdout.write("\n")
    typer.echo(
        f"[{len(result.prompt_ids)} prompt tokens, {len(result.output_ids)} generated ({result.stop_reason}); "
        f"prefill {result.prefill_tok_s:.1f} tok/s, decode {result.decode_tok_s:.1f} tok/s]",
        err=True,
    )


@app.command()
def export(
    variant: VariantOpt = "gemma3-270m",
    target: Annotated[str, typer.Option("--target", "-t", help="android | ios | rpi | linux")] = "android",
    backend: Annotated[
        str | None,
        typer.Option(
            "--backend",
            "-b",
            help="xnnpack | coreml | vulkan | litert | litert-gpu | onnx (default: the target's)",
        ),
    ] = None,
    quant: Annotated[
        str | None,
        typer.Option(
            "--quant",
            "-q",
            help="fp32 | int8 | int4 | int4-2pass | int4-hqq | int4-g128 | int8-wo | int4-wo | rtn-*"
            " (by backend: README), or auto: the fewest bytes within --max-kld",
        ),
    ] = None,
    max_kld: Annotated[
        float | None,
        typer.Option("--max-kld", help="With --quant auto: mean KLD budget on held-out text (default 0.03)."),
    ] = None,
    weights: WeightsOpt = None,
    random_weights: RandomOpt = False,
    seed: SeedOpt = 0,
    max_seq_len: Annotated[int, typer.Option("--max-seq-len", help="KV cache length of the artifact.")] = 1024,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Bundle folder (default exports/<...>).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
    no_cache: NoCacheOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Quantize, lower and write a verified bundle (artifact, tokenizer, manifest, golden logits)."""
    from edge import api
    from edge.paths import out_folder

    if out is not None:
        out = out_folder(out)  # `.`, `..`, the current folder: refused now, not at the final rename
    manifest = api.export(
        variant=variant,
        target=target,
        backend=backend,
        quant=quant,
        weights=weights,
        random_weights=random_weights,
        seed=seed,
        max_seq_len=max_seq_len,
        out=out,
        force=force,
        max_kld=max_kld,
        use_cache=not no_cache,
    )
    if as_json:
        _print_json(manifest)
        return
    size = sum(f["bytes"] for f in manifest["files"].values())
    typer.echo(
        f"{manifest['path']}  ({size / 1e6:.0f} MB, {manifest['backend']} {manifest['quant']['scheme']['name']})"
    )
    for st in manifest["stages"]:
        typer.echo(f"  {st['name']:<10} {st['seconds']:>7.1f} s   peak RSS {st['peak_rss_mb'] / 1024:.2f} GB")
    outside = manifest["delegation"].get("ops_outside_delegate", {})
    if "delegate_calls" in manifest["delegation"]:
        typer.echo(f"  delegate calls {manifest['delegation']['delegate_calls']}, ops outside: {sum(outside.values())}")
    for d in ("ml_drift", "classic"):  # --backend litert-gpu: what each GPU delegate takes
        if gpu := manifest["delegation"].get("gpu", {}).get(d):
            refused = ", ".join(f"{r['op']} x{r['count']}" for r in gpu["refused"]) or "none"
            typer.echo(f"  {gpu['delegate']}: {gpu['supported']} of {gpu['operators']} ops (refused: {refused})")
    skipped = [r for r in manifest["quant"]["coverage"] if r.get("skipped")]
    if skipped:
        typer.echo(
            f"  {len(skipped)} weights kept fp32: " + "; ".join(f"{r['name']} ({r['skipped']})" for r in skipped)
        )


@app.command()
def bench(
    bundle: Annotated[Path, typer.Argument(help="A bundle folder written by `edge export`.")],
    prompt_len: Annotated[int, typer.Option("--prompt-len", help="Prompt tokens (real text, cut).")] = 128,
    gen_len: Annotated[int, typer.Option("--gen-len", help="Greedy tokens generated per round.")] = 64,
    threads: Annotated[int | None, typer.Option("--threads", help="Runtime threads (default: all CPUs).")] = None,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed rounds after a warm-up; medians.")] = 3,
    as_json: JsonOpt = False,
) -> None:
    """Time to first token, prefill and decode tokens/s, and memory of a bundle's artifact on this host."""
    from edge import api
    from edge.progress import say

    r = api.bench(bundle, prompt_len, gen_len, threads, repeats, say=say)
    if as_json:
        _print_json(r)
        return
    lat, mem = r["decode_ms_per_token"], r["memory_mb"]
    typer.echo(f"{r['variant']} {r['scheme']} on {r['backend']} ({r['model_bytes'] / 1e6:.0f} MB): {r['bundle']}")
    typer.echo(f"  {r['threads']} threads, {r['prompt_len']}-token prompt, {r['gen_len']} tokens, "
               f"medians of {r['repeats']} rounds")  # fmt: skip
    typer.echo(f"  load                {r['load_s']:8.2f} s")
    typer.echo(f"  time to first token {r['time_to_first_token_ms']:8.0f} ms")
    typer.echo(f"  prefill             {r['prefill_tok_s']:8.1f} tok/s")
    if r["decode_tok_s"] is not None:
        typer.echo(f"  decode              {r['decode_tok_s']:8.1f} tok/s "
                   f"({lat['p50']:.1f} ms/token median, {lat['p90']:.1f} p90)")  # fmt: skip
    typer.echo(f"  memory              {mem['after_load']:8.0f} MB RSS loaded, {mem['peak']:.0f} MB peak "
               f"({mem['before_load']:.0f} MB before loading)")  # fmt: skip
    if r["ceiling_fraction"] is not None:
        typer.echo(f"  ceiling             {r['ceiling_tok_s']:8.1f} tok/s ({r['read_bandwidth_gb_s']:.1f} GB/s read / "
                   f"{r['model_bytes'] / 1e6:.0f} MB a token): decode at {r['ceiling_fraction']:.0%}")  # fmt: skip
    if not r["rounds_agree"]:
        typer.echo("  warning: the rounds generated different tokens (a nondeterministic runtime?)", err=True)


@app.command()
def doctor(as_json: JsonOpt = False) -> None:
    """Versions, installed backends, memory and disk."""
    from edge import api

    info = api.doctor()
    if as_json:
        _print_json(info)
        return
    typer.echo(f"gemma-edge {info['gemma_edge']}  python {info['python']}  {info['platform']}  {info['cpus']} cpus")
    typer.echo(f"memory {info['memory_gb']['available']} / {info['memory_gb']['total']} GB available")
    typer.echo(f"cache {info['cache']['path']} ({info['cache']['free_gb']} GB free)")
    typer.echo("packages:")
    for name, ver in info["packages"].items():
        typer.echo(f"  {name:<26} {ver or '-- not installed'}")
    typer.echo("backends:")
    for name, b in info["backends"].items():
        typer.echo(f"  {name:<28} {'ok' if b['available'] else 'missing: ' + b['install']}")


cache_app = typer.Typer(help="The quantization cache: quantized tensors reused by later exports and validations.")
app.add_typer(cache_app, name="cache")


@cache_app.command("ls")
def cache_ls(as_json: JsonOpt = False) -> None:
    """List the cached quantizations: key, scheme, source, size."""
    from edge.quant import cache

    rows = cache.entries()
    if as_json:
        _print_json({"path": str(cache.root()), "entries": rows})
        return
    typer.echo(f"{cache.root()}  ({len(rows)} entries, {sum(r['bytes'] for r in rows) / 1e6:.0f} MB)")
    for r in rows:
        what = "unreadable entry" if r.get("broken") else f"{r['scheme']:<10} {r['source']}"
        typer.echo(f"  {r['key']}  {what:<22} {r['bytes'] / 1e6:8.1f} MB")


@cache_app.command("clear")
def cache_clear() -> None:
    """Remove every cached quantization (the next export of each quantizes again)."""
    from edge.quant import cache

    n, size = cache.clear()
    typer.echo(f"removed {n} entries ({size / 1e6:.0f} MB) from {cache.root()}")


@app.command()
def validate(
    bundle: Annotated[Path, typer.Argument(help="A bundle folder written by `edge export`.")],
    stages: Annotated[
        str | None,
        typer.Option("--stages", help="Comma-separated: reference, re-authored, quantized, lowered, device."),
    ] = None,
    device_logits: Annotated[
        Path | None, typer.Option("--device-logits", help="Logits dumped on the device (--dump-logits).")
    ] = None,
    dump_logits: Annotated[
        Path | None, typer.Option("--dump-logits", help="Run the artifact here and write its logits for the host.")
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="Runtime threads for the lowered stage.")] = None,
    report: Annotated[
        Path | None, typer.Option("--report", help="Also write DIR/report.json and a self-contained DIR/report.html.")
    ] = None,
    no_cache: NoCacheOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Compare every stage's logits with the fp32 reference; name the stage that lost accuracy.

    Exit 0: within the scheme's band, or measured only (the scheme has no band, or --stages left the
    artifact out); 1: outside it, NaN logits or a failed probe; 2: bad input (including a modified bundle)."""
    from edge.paths import expand, outside_bundle, readable_file, writable_file
    from edge.progress import say
    from edge.validate.run import validate as run_validate

    chosen = [s.strip() for s in stages.split(",") if s.strip()] if stages else None
    # The files named here are checked before the stages run: a bad one is exit 2 now, not after minutes.
    if device_logits is not None:
        device_logits = readable_file(device_logits, "--device-logits")
    if dump_logits is not None:
        dump_logits = outside_bundle(writable_file(dump_logits, "--dump-logits"), bundle, "--dump-logits")
    if report:
        from edge.validate.report import prepare_dir, write_report

        outside_bundle(expand(report, "--report"), bundle, "--report")
        prepare_dir(report)  # an unwritable folder is exit 2 before minutes of validation, not after
    result = run_validate(bundle, chosen, device_logits, dump_logits, threads, say=say, use_cache=not no_cache)
    if as_json:
        _print_json(result)
    else:
        _print_validation(result)
    if report:
        say(f"report written to {write_report(result, report)}")
    raise typer.Exit(1 if result["verdict"]["passed"] is False else 0)


def _print_validation(r: dict) -> None:
    typer.echo(f"{r['variant']} {r['scheme']} on {r['backend']}: {r['bundle']}")
    cols = ("mean KLD", "p99 KLD", "max KLD", "top-1", "top-5", "max|dlogit|", "ppl x")
    typer.echo(f"{'stage':<12} " + " ".join(f"{c:>9}" for c in cols))
    for name, s in r["stages"].items():
        o = s["overall"]
        typer.echo(
            f"{name:<12} {o['mean_kld']:>9.5f} {o['p99_kld']:>9.4f} {o['max_kld']:>9.4f} {o['top1']:>9.4f} "
            f"{o['top5_overlap']:>9.4f} {o['max_abs_dlogit']:>9.3g} {o.get('ppl_ratio', float('nan')):>9.4f}"
        )
    for name, s in r["stages"].items():
        if "within_window" in s and "past_window" in s:
            w, p = s["within_window"], s["past_window"]
            typer.echo(
                f"  {name}: within the sliding window KLD {w['mean_kld']:.5f} top-1 {w['top1']:.4f} "
                f"({w['positions']} positions); past it KLD {p['mean_kld']:.5f} top-1 {p['top1']:.4f} "
                f"({p['positions']})"
            )
    for name, s in r["stages"].items():
        if "vs_previous" in s:
            c = s["vs_previous"]
            typer.echo(
                f"  {name} vs {c['stage']}: mean KLD {c['mean_kld']:.5f} (max {c['max_kld']:.4f}), top-1 agreement "
                f"{c['top1_agreement']:.4f} ({c['top1_flips']} of {c['positions']} positions moved)"
            )
    typer.echo("probes: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in r["probes"].items()))
    typer.echo(r["kld_note"])
    v = r["verdict"]
    word = {True: "PASS", False: "FAIL", None: "MEASURED"}[v["passed"]]
    typer.echo(f"{word}: {v['sentence']}")


def _quiet_libraries() -> None:
    """The stack's own chatter would bury our progress lines: torchao logs every CUDA extension it
    cannot load on a CPU machine, and torch / executorch emit deprecation warnings by the hundred
    during export. Our stages, errors and hints still print."""
    import logging
    import warnings

    logging.getLogger("torchao").setLevel(logging.CRITICAL)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" x 10
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)


def _terminated(signum, frame) -> None:
    # SIGTERM as an exception: the export's `finally` removes its work folder instead of leaving it behind.
    raise SystemExit(128 + signum)


def main() -> None:
    """Console entry point: EdgeError -> message + hint on stderr, exit 2, no traceback.

    Typer runs non-standalone so that its usage errors (an unknown option, a missing or malformed
    value) reach us too and print in the same `error:` / `hint:` form with exit 2."""
    import signal

    from typer._click.exceptions import ClickException, NoArgsIsHelpError
    from typer.exceptions import Abort

    _quiet_libraries()
    signal.signal(signal.SIGTERM, _terminated)
    try:
        code = app(standalone_mode=False)
    except EdgeError as e:
        typer.echo(f"error: {e.message}", err=True)
        if e.hint:
            typer.echo(f"hint: {e.hint}", err=True)
        sys.exit(e.exit_code)
    except NoArgsIsHelpError as e:  # `edge` or `edge COMMAND` alone: the help, as before
        typer.echo(e.ctx.get_help(), err=True)
        sys.exit(2)
    except ClickException as e:
        typer.echo(f"error: {e.format_message()}", err=True)
        ctx = getattr(e, "ctx", None)
        typer.echo(f"hint: `{ctx.command_path if ctx else 'edge'} --help` lists the options", err=True)
        sys.exit(2)
    except (KeyboardInterrupt, Abort) as e:
        if isinstance(e.__cause__, EOFError):  # Click turns an EOFError from a reader into Abort
            typer.echo(f"error: a file ended before its data did ({e.__cause__})", err=True)
            typer.echo("hint: a file given to this command is empty or cut short; check it or write it anew", err=True)
            sys.exit(2)
        typer.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
