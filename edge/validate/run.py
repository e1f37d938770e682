"""`edge validate`: every stage of the chain against the fp32 reference, and which stage lost accuracy.

Stages, in chain order (shared/DESIGN.md):
  reference    transformers on the same weights        (is the golden file the real Gemma?)
  re-authored  our model, fp32, eager                  (does our model equal it?)
  quantized    our model, the bundle's scheme, eager   (what the scheme costs)
  lowered      the bundle's artifact in its runtime    (what lowering adds)
  device       logits dumped on a device               (what the device's runtime adds)

Each stage is scored against golden.npz on the golden positions, and against the stage before it
(`vs_previous`: pointwise KLD and argmax moves, what that one step changed). The verdict uses the scheme's
band (edge/quant/schemes.py) on the last stage; when it fails, the first stage whose own metrics
break the band is named, with its increment over the stage before it.

Device mode: with only numpy and a runtime installed, the stages that need torch are skipped and
`lowered` runs alone; `--dump-logits` writes the compact per-position record (metrics.Observed)
that `--device-logits` reads back on the host. Nothing heavy is imported at module level.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from edge.errors import EdgeError

STAGES = ("reference", "re-authored", "quantized", "lowered", "device")
HOST_STAGES = ("reference", "re-authored", "quantized")
WHAT = {
    "reference": "transformers fp32 on the same weights",
    "re-authored": "gemma-edge fp32, eager",
    "quantized": "gemma-edge {scheme}, eager",
    "lowered": "{artifact} on {backend}, this host",
    "device": "logits dumped on the device ({source})",
}


def has_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


def _band(manifest: dict) -> dict:
    """The scheme's band as recorded in the bundle (a device may not have the scheme table's code)."""
    return manifest["quant"]["scheme"].get("band") or {}


def breaks(row: dict, band: dict) -> list[str]:
    """Which of the band's limits this stage's overall row breaks (empty: within the band).

    Written as `not (value <= limit)`: a NaN compares false both ways, and must break every limit."""
    out = []
    if row.get("nonfinite_positions"):
        out.append(f"{row['nonfinite_positions']} positions with NaN or infinite logits")
    if band.get("mean_kld") is not None and not row["mean_kld"] <= band["mean_kld"]:
        out.append(f"mean KLD {row['mean_kld']:.4f} > {band['mean_kld']}")
    if band.get("top1") is not None and not row["top1"] >= band["top1"]:
        out.append(f"top-1 {row['top1']:.3f} < {band['top1']}")
    if band.get("max_abs_logit") is not None and not row["max_abs_dlogit"] <= band["max_abs_logit"]:
        out.append(f"max |dlogit| {row['max_abs_dlogit']:.2e} > {band['max_abs_logit']}")
    return out


def verdict(results: dict[str, dict], band: dict, window: int | None, probes: dict | None = None) -> dict:
    """Pass/fail on the last stage; the first stage that breaks the band, and by how much it added.

    Failures whatever the band: a stage with NaN or infinite logits, a failed probe. PASS needs the
    artifact itself to have run (the lowered or device stage); without it the result is measured only."""
    order = [s for s in STAGES if s in results]
    if not order:
        raise EdgeError("no stage was evaluated", hint="choose stages with --stages, or pass --device-logits")
    final = order[-1]
    for stage in order:
        if bad := results[stage]["overall"].get("nonfinite_positions"):
            return {
                "passed": False,
                "final_stage": final,
                "culprit": stage,
                "broken": [f"{bad} positions with NaN or infinite logits"],
                "sentence": f"{stage} produced NaN or infinite logits at {bad} positions",
            }
    failed = sorted(k for k, ok in (probes or {}).items() if not ok)
    if failed:
        return {
            "passed": False,
            "final_stage": final,
            "broken": [f"probe {k}" for k in failed],
            "sentence": f"probe(s) failed: {', '.join(failed)} (the bundle's tokenizer or prompts are not the model's)",
        }
    if not band:
        return {"passed": None, "final_stage": final, "sentence": "this scheme has no band: measured only"}
    if final not in ("lowered", "device") and not breaks(results[final]["overall"], band):
        return {
            "passed": None,
            "final_stage": final,
            "band": band,
            "sentence": f"{final} is within the band, but the artifact itself was not run (no lowered or device"
            " stage): measured only",
        }
    failing = breaks(results[final]["overall"], band)
    out = {"passed": not failing, "final_stage": final, "band": band}
    if not failing:
        out["sentence"] = f"{final} is within the band ({', '.join(f'{k} {v}' for k, v in band.items() if v)})"
        return out
    prev = None
    for stage in order:
        if breaks(results[stage]["overall"], band):
            row = results[stage]
            added = row["overall"]["mean_kld"] - (results[prev]["overall"]["mean_kld"] if prev else 0.0)
            where = ""
            if window and "past_window" in row and "within_window" in row:
                before = results[prev] if prev else {}
                inc = {
                    side: row[side]["mean_kld"] - (before[side]["mean_kld"] if side in before else 0.0)
                    for side in ("within_window", "past_window")
                }
                if inc["past_window"] > 2 * max(inc["within_window"], 1e-9):
                    where = f" on positions past the sliding window ({window})"
                elif inc["within_window"] > 2 * max(inc["past_window"], 1e-9):
                    where = f" on positions within the sliding window ({window})"
            out |= {"culprit": stage, "added_mean_kld": added, "broken": breaks(row["overall"], band)}
            out["sentence"] = (
                f"{stage} added mean KLD {added:.4f}{where}"
                + (f" over {prev}" if prev else "")
                + f": {'; '.join(out['broken'])}"
            )
            return out
        prev = stage
    raise AssertionError("unreachable: the final stage breaks the band")


def probes(manifest: dict, prompts) -> dict:
    """Gemma checks that need no model: BOS first; the bundle's tokenizer gives the golden ids."""
    bos = manifest["special_ids"]["bos"]
    out = {"bos_first": all(int(p.ids[0]) == bos for p in prompts)}
    if importlib.util.find_spec("sentencepiece") is not None:
        from edge.models.tokenizer import Tokenizer
        from edge.validate.golden import prompt_ids

        tok = Tokenizer(Path(manifest["path"]) / manifest["tokenizer"]["file"])
        want = prompt_ids(tok, manifest["arch"]["vocab_size"], manifest["max_seq_len"])
        out["tokenizer_matches_golden"] = all(want.get(p.name) == [int(i) for i in p.ids] for p in prompts)
    return out


def softcap_peaks(observed: dict, cap: float) -> dict:
    """Gemma 2 caps its logits with cap * tanh(x / cap): a stage whose logits exceed the cap lost it.

    The peak is taken over the logits at the reference's top-k ids of every position (where the
    largest logits are); a float32 tanh may round to the cap itself, never beyond it.
    """
    peak = max(float(abs(o.at_ref_topk).max()) for o in observed.values())
    return {"cap": cap, "max_abs_logit": peak, "ok": peak <= cap * (1 + 1e-6)}


def _stage_logits(stage: str, manifest: dict, host: dict, threads: int | None):
    """The logits function of a stage. `host` caches the loaded weights across the torch stages."""
    from edge.validate import stages as st

    if stage == "lowered":
        from edge.runtime.runners import open_runner

        return st.runner_logits(open_runner(manifest, threads=threads))
    import torch

    torch.set_grad_enabled(False)
    if "loaded" not in host:
        host["loaded"] = _load_weights(manifest)
    loaded = host["loaded"]
    if stage == "reference":
        from edge.models.reference import build_reference

        ref = build_reference(loaded.config, loaded.tensors)

        def fn(ids: list[int]):
            return ref(torch.tensor([ids])).logits[0].float().numpy()

        return fn
    model = loaded.build(manifest["max_seq_len"])
    if stage == "quantized":
        from edge.quant import cache as quant_cache
        from edge.quant.apply import calibration
        from edge.quant.schemes import Scheme, get_scheme
        from edge.quant.transcode import grids_for

        recorded = manifest["quant"]["scheme"]
        if recorded["name"] == "auto":  # its per-tensor choice exists only in the manifest
            scheme = Scheme.from_dict(recorded)
        else:
            scheme = get_scheme(recorded["name"])
            _check_same_scheme(recorded, scheme)
        calib = calibration(loaded.tokenizer, loaded.config.vocab_size) if scheme.calibrated else None
        # the export's quantization, when this machine made it (edge/quant/cache.py; auto's chosen tensors too)
        identity = quant_cache.source_identity(loaded.source, loaded.config.to_dict())
        grids = grids_for(loaded, scheme)
        use, say = host.get("use_cache", True), host.get("say", lambda s: None)
        quant_cache.quantize(model, scheme, calib, grids, identity, use_cache=use, say=say)
    return st.eager_logits(model)


def _check_same_scheme(recorded: dict, scheme) -> None:
    """The quantized stage rebuilds the scheme by name from this version's table: a bundle made by a
    version whose scheme of that name differed would be compared with another model, silently."""
    import dataclasses

    now = json.loads(json.dumps(scheme.to_dict()))
    # A field added after the bundle was made (absent from its manifest) held its default then.
    defaults = {f.name: f.default for f in dataclasses.fields(scheme) if f.default is not dataclasses.MISSING}
    recorded = json.loads(json.dumps(defaults)) | recorded
    differ = sorted(k for k in now.keys() | recorded.keys() if k != "description" and now.get(k) != recorded.get(k))
    if differ:
        raise EdgeError(
            f"the bundle's {scheme.name!r} scheme is not this gemma-edge's ({', '.join(differ)} differ): its"
            " quantized stage cannot be rebuilt here",
            hint="re-export the bundle with this version, or run --stages reference,re-authored,lowered",
        )


def _load_weights(manifest: dict):
    """The weights the bundle was exported from, as its manifest records them."""
    from edge.models.loading import load_weights
    from edge.models.variants import get_variant

    src = manifest["weights"]
    variant = get_variant(manifest["variant"])
    if src["kind"] == "random":
        return load_weights(variant, None, True, int(src.get("seed", 0)))
    if src["kind"] in ("gguf", "hf"):
        if not Path(src["path"]).exists():
            raise EdgeError(
                f"the bundle was exported from {src['path']}, which is not here",
                hint="validate on the machine that exported it, or run only --stages lowered,device",
            )
        return load_weights(variant, Path(src["path"]), False, 0)
    return load_weights(variant, None, False, 0)


def validate(
    bundle: str | Path,
    stages: list[str] | None = None,
    device_logits: str | Path | None = None,
    dump_logits: str | Path | None = None,
    threads: int | None = None,
    say=lambda msg: None,
    use_cache: bool = True,
) -> dict:
    """use_cache: the quantized stage takes the export's quantization from the quantization cache
    (edge/quant/cache.py) when this machine made it, instead of quantizing again."""
    from edge import bundle as bundle_mod
    from edge.targets import BACKENDS
    from edge.validate import golden
    from edge.validate import stages as st

    manifest = bundle_mod.load(bundle)  # every file's sha256 first: a modified file is exit 2
    path = Path(manifest["path"])
    if dump_logits is not None:  # the CLI checks it too, before loading; callers of the API get the same
        from edge.paths import expand, outside_bundle

        outside_bundle(expand(dump_logits, "--dump-logits"), path, "--dump-logits")
    prompts = golden.load(path / manifest["golden"]["file"], manifest["arch"]["vocab_size"], manifest["max_seq_len"])
    window = manifest["arch"].get("sliding_window")
    backend = BACKENDS.get(manifest["backend"])
    if backend is None:
        raise EdgeError(
            f"the bundle's backend {manifest['backend']!r} is not one this gemma-edge knows",
            hint=f"known backends: {', '.join(BACKENDS)}; validate it with the version that exported it",
        )
    runs_here = backend.runs_here and backend.runnable()
    if stages is None:
        if not runs_here and not device_logits:
            # A default run that silently dropped the artifact's own stage would judge only the eager model.
            raise EdgeError(
                f"the {backend.name} artifact cannot run on this host, so validating it here would not check it",
                hint="run `edge validate --dump-logits FILE` on the device and pass --device-logits FILE here,"
                " or name the host stages with --stages to measure them only",
            )
        stages = [*(HOST_STAGES if has_torch() else ()), *(("lowered",) if runs_here else ())]
        stages += ["device"] if device_logits else []
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise EdgeError(f"unknown stage(s) {unknown}", hint=f"choose from: {', '.join(STAGES)}")
    if "device" in stages and not device_logits:
        raise EdgeError("the device stage needs --device-logits FILE", hint="write it on the device: --dump-logits")
    if dump_logits and "lowered" not in stages:
        stages = [*stages, "lowered"]
    if any(s in HOST_STAGES for s in stages) and not has_torch():
        raise EdgeError(
            f"stages {[s for s in stages if s in HOST_STAGES]} need torch, which is not installed here",
            hint="on a device, run --stages lowered (and --dump-logits FILE for the host)",
        )
    if "lowered" in stages and not runs_here:
        raise EdgeError(
            f"the {manifest['backend']} artifact cannot run on this host",
            hint="run `edge validate --dump-logits FILE` on the device, then `--device-logits FILE` here",
        )

    results: dict[str, dict] = {}
    before: tuple[str, dict] | None = None  # the previous stage and its Observed (vs_previous)
    host: dict = {"use_cache": use_cache, "say": say}
    cap = manifest["arch"].get("final_softcap")
    what = {
        "scheme": manifest["quant"]["scheme"]["name"],
        "artifact": manifest["artifact"],
        "backend": manifest["backend"],
        "source": Path(device_logits).name if device_logits else "",
    }
    for stage in [s for s in STAGES if s in stages]:
        say(f"[{stage}] {WHAT[stage].format(**what)}")
        if stage == "device":
            try:
                observed, meta = st.load_dump(device_logits)
            except (OSError, ValueError, KeyError) as e:
                raise EdgeError(f"cannot read {device_logits}: {e}", hint="pass a file from --dump-logits") from e
            if meta.get("bundle_sha256") != manifest["files"][manifest["artifact"]]["sha256"]:
                raise EdgeError(
                    f"{device_logits} was dumped from another artifact than this bundle's",
                    hint="dump the logits with this very bundle on the device",
                )
        else:
            observed = st.observe(prompts, _stage_logits(stage, manifest, host, threads))
        if stage == "lowered" and dump_logits:
            st.dump(dump_logits, observed, {"bundle_sha256": manifest["files"][manifest["artifact"]]["sha256"]})
            say(f"  logits written to {dump_logits}")
        try:
            results[stage] = st.score(prompts, observed, window)
        except ValueError as e:
            raise EdgeError(f"{stage}: {e}", hint="dump the logits again with this bundle") from e
        results[stage]["what"] = WHAT[stage].format(**what)
        if before is not None:
            results[stage]["vs_previous"] = {"stage": before[0]} | st.compare(before[1], observed)
        before = (stage, observed)
        if cap:
            results[stage]["softcap"] = softcap_peaks(observed, cap)
        o = results[stage]["overall"]
        say(f"  mean KLD {o['mean_kld']:.5f}  top-1 {o['top1']:.4f}  max |dlogit| {o['max_abs_dlogit']:.3g}")
        if "vs_previous" in results[stage]:
            c = results[stage]["vs_previous"]
            say(f"  vs {c['stage']}: mean KLD {c['mean_kld']:.5f}, {c['top1_flips']} of {c['positions']} argmax moved")
    found = probes(manifest, prompts) | (
        {"final_softcap": all(r["softcap"]["ok"] for r in results.values())} if cap else {}
    )
    return {
        "bundle": str(path),
        "variant": manifest["variant"],
        "scheme": what["scheme"],
        "backend": manifest["backend"],
        "window": window,
        "kld_note": "KLD over the reference's top-128 plus one tail bucket: a lower bound of the full KLD"
        " (vs_previous: a stage against the stage before it, over the same ids)",
        "probes": found,
        "stages": results,
        "verdict": verdict(results, _band(manifest), window, found),
    }
