"""Model work: compile, predict, list models, the squeeze estimator."""

from __future__ import annotations

import json
from pathlib import Path

from .args import (UserError, compile_args, data_args, data_cfg, model_args, modes_arg, predictor, progress_bar, say,
                   server_arg, settle_stability, stability_args)


def add_compile(sub) -> None:
    p = sub.add_parser("compile", help="compile a saved model to a TFHE circuit (cached)")
    stability_args(p)
    data_args(p)
    model_args(p)
    compile_args(p)
    p.add_argument("--force", action="store_true", help="recompile even if cached")
    p.add_argument("--keygen", action="store_true", help="also generate keys and report their size and time")
    p.add_argument("--json", default=None, help="write the compile report to this file")
    p.add_argument("--ship", action="store_true", help="also write the circuit into the model's folder (its "
                   "portable part, a few hundred KB): a fresh clone then compiles nothing at start")


def cmd_compile(a) -> int:
    from ..study.evaluate import circuit_line

    p = predictor(a)
    if a.force:
        from ..fhe.circuit import compile_model

        p.compiled = compile_model(p.saved, p.compile_config, p.cache_dir, say, force=True)
    compiled = p.ensure_compiled()
    report = compiled.report.to_dict()
    report.pop("files", None)
    if a.keygen:
        client = p.ensure_client()
        client.keygen()
        report.update(keygen_s=client.keygen_s, eval_key_bytes=len(client.evaluation_keys()))
    print(f"{p.saved.dataset}/{p.saved.name} -> {compiled.path}")
    print(circuit_line(report))
    if a.ship:
        from ..fhe.circuit import cache_key
        from ..fhe.runtime import ship

        if compiled.report.cache_key != cache_key(p.saved.hash, p.saved.config.compile):
            raise UserError("--ship writes the circuit of the model's own compile settings; drop the compile flags.")
        print(f"shipped with the model: {ship(compiled, p.saved)}")
    if a.stability_images:
        s = settle_stability(p.saved, p.compile_config or p.saved.config.compile, a, compiled, p.cache_dir,
                             latency_images=0)
        if s is not None:
            report["stability"] = s.current.to_dict()
            report["nearest_stable"] = s.proposal.to_dict() if s.proposal else None
            report["adopted"] = s.adopted
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


def add_predict(sub) -> None:
    p = sub.add_parser("predict", help="classify images in one or more modes")
    data_args(p)
    model_args(p)
    compile_args(p)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--index", type=int, nargs="+", default=[0], help="image indices in the split")
    p.add_argument("--image", nargs="+", default=None, help="image files (PNG, JPEG, BMP, TIFF, .npy) instead of --index")
    p.add_argument("--point", default=None, metavar="FILE",
                   help="decide with this operating point (evaluate --images ... --save-point makes one; default: argmax)")
    modes_arg(p, "all")
    server_arg(p)
    p.add_argument("--json", default=None)


def cmd_predict(a) -> int:
    import numpy as np

    from ..learn.data import load_split
    from ..learn.metrics import label_text

    sub = None
    if not a.image:
        split = load_split(data_cfg(a), a.split)
        bad = [i for i in a.index if not 0 <= i < len(split)]
        if bad:
            raise UserError(f"index {bad[0]} out of range: the {a.split} split has {len(split)} images (0..{len(split) - 1})")
        sub = split.subset(a.index)
    from ..learn import guard as guards

    p = predictor(a)
    info = p.info
    say(f"{p.saved.dataset}/{p.saved.name}: feature stage {p.saved.stage_text()}")
    guard = guards.for_model(p.saved, data_cfg(a))
    point = None
    if a.point:
        from ..study.operating import OperatingPoint

        point = OperatingPoint.load(a.point).check(p.saved)
    images, names, truth, verdicts = _predict_inputs(a, p, guard, sub)
    bar, update = progress_bar("predicting")
    results = p.run(images, a.modes, progress=update)
    bar.close()
    print(f"answers: {point.describe() if point is not None else 'argmax (no operating point)'}")
    out = []
    for i, name in enumerate(names):
        row = {"image": name, "true": truth[i]}
        for mode, r in results.items():
            row[mode] = {"label": label_text(info, r.predictions[i]), "probabilities": np.round(r.scores[i], 4).tolist(),
                         "latency_s": round(float(r.latency_s[i]), 5)}
            for k, v in r.stages.items():
                row[mode][k] = round(float(v[i]), 5)
        conf_text = ""
        if guard is not None:
            last = results[list(results)[-1]]
            c = guard.confidence(last.logits[i], verdicts.get(name))
            row["confidence"] = None if c.shown is None else round(c.shown, 4)
            row["uncertain"] = c.uncertain
            conf_text = ("  uncertain (flagged input: no confidence)" if c.withheld else
                         f"  confidence {100 * c.top:.0f}%" + (" (uncertain)" if c.uncertain else ""))
        if name in verdicts:
            row["foreign_input"] = verdicts[name].foreign
            row["warning"] = verdicts[name].message
        if point is not None:
            row.update(_decided(point, results[list(results)[-1]].logits[i], guard, info, verdicts.get(name)))
            conf_text += f"  decided: {row['decision']} (P({point.finding_name}) {100 * row['finding_probability']:.0f}%, " \
                         f"threshold {100 * point.threshold:.0f}%)"
        out.append(row)
        truth_text = f"true={row['true']}  " if row["true"] is not None else ""
        print(f"{name}: {truth_text}" + "  ".join(f"{m}={row[m]['label']} ({row[m]['latency_s'] * 1000:.1f} ms)" for m in results)
              + conf_text)
    if "fhe" in results:
        fhe = results["fhe"]
        print(f"fhe sizes: ciphertext {fhe.sizes['ciphertext_bytes']:,} B, result {fhe.sizes['result_bytes']:,} B, "
              f"evaluation keys {fhe.sizes['eval_key_bytes']:,} B; keygen {p.client.keygen_s:.2f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


def _predict_inputs(a, p, guard, sub):
    """The images to classify (files through the upload path, each checked, or split indices),
    their names, true labels and the input check's verdicts."""
    import numpy as np

    from ..learn.images import load_image
    from ..learn.metrics import label_text

    info = p.info
    verdicts = {}
    if a.image:
        sharpness = guard.sharpness if guard is not None else None
        loaded = [load_image(Path(f), p.saved.config.data.size, info.n_channels, sharpness=sharpness,
                             framing=guard.framing if guard is not None else None) for f in a.image]
        images = np.stack([im.array for im in loaded])
        names, truth = list(a.image), [None] * len(a.image)
        if guard is None:
            say("no input check: the model has no guard file and its dataset is not on this machine")
        else:
            for name, im in zip(names, loaded):
                v = guard.check(im.array, im.original)
                verdicts[name] = v
                if v.foreign:
                    print(f"warning: {name} does not look like a {p.saved.dataset} image: {v.message}")
    else:
        images, names = sub.images, [f"{a.split}[{i}]" for i in a.index]
        truth = [label_text(info, t) for t in sub.targets]
    return images, names, truth, verdicts


def _decided(point, logits, guard, info, verdict) -> dict:
    """One answer decided at an operating point: a flagged input stays uncertain whatever the point."""
    prob = float(point.probability(logits[None], info, guard)[0])
    return {"decision": point.answer(prob, info.labels, verdict is not None and verdict.foreign),
            "finding_probability": round(prob, 4), "threshold": point.threshold, "refer_band": point.refer}


def add_models(sub) -> None:
    p = sub.add_parser("models", help="list saved models")
    p.add_argument("--dataset", default=None)
    p.add_argument("--models-dir", default=None)


def cmd_models(a) -> int:
    from ..learn import registry

    models = registry.list_models(a.dataset, a.models_dir)
    if not models:
        print("no saved models")
    for m in models:
        s = m.summary()
        print(f"{s['dataset']:<16} {s['name']:<44} hidden={s['hidden']} bits={s['bits (w/a/in)']} "
              f"val_acc={s['val_accuracy'] or 0:.4f} test_acc={s['test_accuracy'] or 0:.4f} {s['created']}")
    return 0


def add_framing(sub) -> None:
    p = sub.add_parser("framing", help="fit the squeeze estimator that reframes uploads squeezed sideways (stored beside the model)")
    data_args(p)
    model_args(p)
    p.add_argument("--seeds", type=int, default=3, help="estimators averaged (each about 80 s on 2 cores)")
    p.add_argument("--epochs", type=int, default=14)
    p.add_argument("--samples", type=int, default=20000, help="synthetic squeezed bands per epoch")
    p.add_argument("--remove", action="store_true", help="delete the model's estimator: uploads are no longer reframed")


def cmd_framing(a) -> int:
    from ..learn import framing, registry
    from ..learn.data import load_split

    saved = registry.load(a.dataset, a.model, a.models_dir)
    path = saved.path / framing.FRAMING_FILE
    if a.remove:
        path.unlink(missing_ok=True)
        print(f"{saved.dataset}/{saved.name}: uploads are no longer reframed")
        return 0
    if min(a.seeds, a.epochs, a.samples) < 1:
        raise UserError("--seeds, --epochs and --samples must be at least 1")
    cfg = data_cfg(a)
    bar, update = progress_bar("fitting the squeeze estimator")
    fr = framing.fit(load_split(cfg, "train").images, seeds=tuple(range(a.seeds)), epochs=a.epochs, per_epoch=a.samples,
                     progress=lambda f: update(round(100 * f), 100, "train split only"))
    bar.close()
    fr.save(saved.path)
    val = load_split(cfg, "val")
    est = [fr.estimate(x) for x in val.images]
    reframed = sum(e * fr.scale < fr.threshold for e in est)
    print(f"saved {path}")
    print(f"validation images as uploads: median squeeze {sorted(est)[len(est) // 2]:.2f}; "
          f"{reframed} of {len(est)} would be reframed (keep s x {fr.scale:g} of the width when below {fr.threshold:g})")
    return 0


COMMANDS = {"compile": (add_compile, cmd_compile), "predict": (add_predict, cmd_predict),
            "models": (add_models, cmd_models), "framing": (add_framing, cmd_framing)}
