"""The pipeline's stages as plain functions: what each Snakemake rule runs through the CLI.

Each takes the resolved config (or the slice of it the rule passes), its input and output
paths, and a tracking run (`tracking.StageRun`); each writes its outputs atomically.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from sslpipe import data as data_mod
from sslpipe import distributed as ddp
from sslpipe import evaluate as ev
from sslpipe import models
from sslpipe.io import read_json, save_png, write_json, write_npz
from sslpipe.progress import pct, say


def prepare(cfg: dict, out_dir: Path, run) -> dict:
    t0 = time.perf_counter()
    manifest = data_mod.prepare(cfg["data"], out_dir)
    run.log({"n_train": manifest["counts"]["train"], "n_test": manifest["counts"]["test"],
             "num_classes": manifest["num_classes"], "prepare_s": time.perf_counter() - t0})
    run.artifact(out_dir / "manifest.json")
    c, s = manifest["counts"], manifest["image_size"]
    say(f"prepare {manifest['dataset']}: {c['train']} train / {c['test']} test images, {manifest['num_classes']} "
        f"classes, {s}x{s}x{manifest.get('channels', '?')}; wrote {out_dir}/train.npz, test.npz, manifest.json "
        f"in {time.perf_counter() - t0:.1f} s")
    return manifest


def preview_indices(y: np.ndarray, count: int) -> np.ndarray:
    """One image per class in turn, so the preview shows the variety of the data."""
    rank = np.zeros(len(y), dtype=np.int64)  # position of each image within its class
    for c in np.unique(y):
        rank[y == c] = np.arange((y == c).sum())
    return np.lexsort((y, rank))[:count]


def augment(cfg: dict, method: str, seed: int, data_dir: Path, out_dir: Path, run) -> dict:
    """Resolve and validate the method's view policy, write a preview grid, measure throughput."""
    from sslpipe import augment as aug
    from sslpipe.methods import METHODS

    manifest = data_mod.load_manifest(data_dir)
    x, y = data_mod.load_split(data_dir, "train")
    cls = METHODS[method]
    policy = cls.policy(cfg[method], manifest["image_size"])
    torch.manual_seed(seed)

    # Validate on a real batch: every view has the input's shape and stays in [0, 1].
    xb = torch.from_numpy(x[preview_indices(y, cfg["augment"]["preview_images"])]).permute(0, 3, 1, 2)
    views = cls.preview(policy, aug.to_float(xb))
    for i, v in enumerate(views):
        if v.shape != xb.shape or not torch.isfinite(v).all() or v.min() < 0 or v.max() > 1:
            raise ValueError(f"{method}: view {i} of the policy is malformed: shape {tuple(v.shape)}, "
                             f"range [{v.min():.3f}, {v.max():.3f}]; expected {tuple(xb.shape)} in [0, 1]")
    save_png(aug.preview_grid(aug.to_float(xb), views), out_dir / "preview.png", min_height=480)

    # Throughput of the views the method trains on, on one batch of real images.
    n = min(len(x), cfg["augment"]["benchmark_images"])
    batch = torch.from_numpy(x[:n]).permute(0, 3, 1, 2).contiguous()
    cls.preview(policy, aug.to_float(batch[:16]))  # warm-up
    t0 = time.perf_counter()
    cls.preview(policy, aug.to_float(batch))
    dt = time.perf_counter() - t0
    bench = {"images": n, "views_per_image": policy["n_views"], "seconds": dt, "images_per_s": n / dt,
             "device": "cpu", "threads": torch.get_num_threads()}
    write_json(out_dir / "benchmark.json", bench)
    write_json(out_dir / "policy.json", policy)
    run.log({"aug_images_per_s": bench["images_per_s"]})
    for name in ("policy.json", "preview.png", "benchmark.json"):
        run.artifact(out_dir / name)
    say(f"augment {method}: {policy['n_views']} view(s) per image, checked on {len(xb)} images (shape, range); "
        f"{bench['images_per_s']:.0f} images/s on {n} images; wrote {out_dir}/policy.json, preview.png, benchmark.json")
    return policy


def pretrain(cfg: dict, method: str, seed: int, data_dir: Path, policy: Path, out_dir: Path, run,
             checkpoint: Path | None = None) -> dict:
    from sslpipe import pretrain as pt  # the methods load only in the jobs that train

    summary = pt.run(cfg, method, seed, data_dir, policy, out_dir, log=run.log, checkpoint=checkpoint)
    summary["run_id"] = run.run_id
    run.dataset(data_mod.load_manifest(data_dir), "train")
    run.artifact(out_dir / "history.csv")
    run.artifact(out_dir / "encoder.pt", "encoder")  # a plain state dict: models.load_encoder reads it
    for png in sorted(out_dir.glob("*.png")):
        run.artifact(png, "diagnostics")
    pt.write_summary(out_dir, summary)
    if ddp.is_main():  # under torchrun every rank runs this stage; rank 0 speaks for them
        say(f"pretrain {method} seed={seed}: final loss {summary['final_loss']:.4f}, {summary['wall_time_s']:.1f} s, "
            f"{summary['images_per_s']:.0f} images/s; wrote {out_dir}/encoder.pt, history.csv, summary.json")
    return summary


def _eval_setup(cfg: dict, data_dir: Path):
    manifest = data_mod.load_manifest(data_dir)
    xtr, ytr = data_mod.load_split(data_dir, "train")
    xte, yte = data_mod.load_split(data_dir, "test")
    device = models.pick_device(cfg["device"])
    return manifest, xtr, ytr, xte, yte, device, models.pick_dtype(cfg["precision"], device)


def _encoder_for(cfg: dict, name: str, seed: int, data_dir: Path, encoder_path: Path | None, manifest: dict,
                 ytr, device, amp, run, checkpoint: Path | None = None) -> tuple[torch.nn.Module, dict]:
    """The encoder to evaluate: pretrained (encoder_path), supervised (trained here, with labels,
    resuming from `checkpoint`) or random (seeded initialisation); plus any metrics its making produced."""
    if encoder_path is not None:
        return models.load_encoder(cfg["model"], manifest, encoder_path), {}
    if name == "supervised":
        from sslpipe import supervised

        return supervised.train(cfg, manifest, data_dir, ytr, seed, device, amp, log=run.log, checkpoint=checkpoint)
    if name == "random":
        torch.manual_seed(seed)
        return models.build_encoder(cfg["model"], manifest), {}
    raise ValueError(f"unknown baseline '{name}': use pixels, random or supervised (evaluate.baselines)")


def linear_eval(cfg: dict, name: str, seed: int, data_dir: Path, encoder_path: Path | None, out: Path, run,
                predictions: Path | None = None, checkpoint: Path | None = None,
                embedding: Path | None = None, summary: Path | None = None) -> dict:
    """Evaluate a pretrained encoder (`encoder_path`) or a baseline (`name` pixels / random /
    supervised): metrics.json at `out`, the test features' PCA picture at `embedding` (by default
    beside `out`; the rules pass their declared output), the pretraining's run id from its
    `summary` (summary.json: with an encoder, the rules pass their declared input), and with
    `predictions` an npz of per-test-image hits (uint8, test order) for each top-1 metric.
    `checkpoint`: the supervised baseline's resume checkpoint, deleted once metrics.json is written."""
    manifest, xtr, ytr, xte, yte, device, amp = _eval_setup(cfg, data_dir)
    say(f"linear_eval {name} seed={seed}: {'encoder ' + str(encoder_path) if encoder_path else 'baseline'}, "
        f"{len(ytr)} train / {len(yte)} test images, device {device}; features in fp32, then linear probe "
        f"(weight decay from {cfg['evaluate']['weight_decays']}), label fractions, kNN")
    t0 = time.perf_counter()
    correct: dict = {}
    # The rules pass their declared output; a direct caller (tests, by hand) gets it beside metrics.json.
    embedding = Path(embedding) if embedding else Path(out).with_name("embedding.png")
    picture = {"embedding": embedding, "title": f"{name} seed {seed}: test features, PCA",
               "class_names": manifest.get("classes"), "correct": correct}
    if name == "pixels":
        metrics = ev.evaluate_features(ev.pixel_features(xtr), ytr, ev.pixel_features(xte), yte,
                                       manifest["num_classes"], cfg["evaluate"], seed, **picture)
        metrics["encoder_unchanged"] = True  # no encoder to change
    else:
        encoder, made = _encoder_for(cfg, name, seed, data_dir, encoder_path, manifest, ytr, device, amp, run,
                                     checkpoint)
        # Features in fp32 whatever `precision` says: autocast is a training-speed device, and an
        # evaluation must not depend on the CPU's bf16 support (features in bf16 moved linear
        # top-1 by up to 6 points). `amp` only speeds up the supervised baseline's training.
        metrics = ev.evaluate_encoder(encoder, xtr, ytr, xte, yte, manifest["num_classes"], cfg["evaluate"],
                                      seed, device, None, **picture)
        metrics.update(made)
    metrics["eval_precision"] = "fp32"
    metrics.update({"name": name, "kind": "ssl" if encoder_path is not None else "baseline", "seed": seed,
                    "dataset": manifest["dataset"], "eval_s": time.perf_counter() - t0, "run_id": run.run_id})
    if encoder_path is not None:
        metrics["pretrain_run_id"] = read_json(summary).get("run_id") if summary else None
        if metrics["pretrain_run_id"] and run.run_id:  # linked both ways: either run's page leads to the other
            run.tag("sslpipe.pretrain_run_id", metrics["pretrain_run_id"])
            run.tag("sslpipe.eval_run_id", run.run_id, run_id=metrics["pretrain_run_id"])
            # The run's description (Markdown on its MLflow page): a link there, not only an id.
            pid, job = metrics["pretrain_run_id"], f"{name}/seed{seed}"
            run.tag("mlflow.note.content", f"Linear evaluation of the encoder trained by "
                                           f"[pretrain/{job}](#/runs/{pid}) (run {pid}).")
            run.tag("mlflow.note.content", f"Pretraining of {job}; its encoder is evaluated by "
                                           f"[linear_eval/{job}](#/runs/{run.run_id}) (run {run.run_id}).", run_id=pid)
    run.dataset(manifest, "eval")
    run.log({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
             and k not in ("seed",)})
    if predictions is not None:
        write_npz(predictions, {k: v.astype(np.uint8) for k, v in correct.items()})
    write_json(out, metrics)
    if checkpoint is not None:  # the outputs now hold all that it was kept for
        Path(checkpoint).unlink(missing_ok=True)
    run.artifact(out)
    run.artifact(picture["embedding"])
    if predictions is not None:  # `compare` reads it back for its paired intervals
        run.artifact(predictions)
    say("linear_eval " + eval_line(metrics) + f"; wrote {out}" + (f", {predictions.name}" if predictions is not None else "")
        + f", embedding.png in {metrics['eval_s']:.1f} s")
    return metrics


def eval_line(m: dict) -> str:
    """'simclr seed=0: linear top-1 91.2% (top-5 99.4%, weight decay 0.001, val 90.3%), 10%: 85.1%, kNN top-1 88.0% (k=20)'"""
    fracs = "".join(f", {k[len('linear_top1_'):].replace('pct', '%')} of labels: {pct(v)}" for k, v in m.items()
                    if k.startswith("linear_top1_") and isinstance(v, float))
    return (f"{m['name']} seed={m['seed']}: linear top-1 {pct(m['linear_top1'])} (top-5 {pct(m.get('linear_top5'))}, "
            f"weight decay {m.get('probe_weight_decay')}, validation {pct(m.get('probe_val_top1'))}){fracs}, "
            f"kNN top-1 {pct(m.get('knn_top1'))} (k={m.get('knn_k')})")


def report(cfg: dict, inputs: dict, out_dir: Path, run) -> dict:
    """`inputs`: every file the report reads, as its rule declares them (`report.build_report`)."""
    from sslpipe import config as config_mod
    from sslpipe import provenance
    from sslpipe import report as report_mod
    from sslpipe import tracking

    prov = {"config_hash": config_mod.config_hash(cfg), **provenance.describe(),
            "tracking_uri": tracking.tracking_uri(tracking.settings()) if cfg["tracking"]["enabled"] else "off",
            "experiment": cfg["name"], "report_run_id": run.run_id, "config": cfg}
    if run.run_id:  # the report links the experiment's page in the MLflow UI
        prov["experiment_id"] = run.client.get_run(run.run_id).info.experiment_id
    result = report_mod.build_report(inputs, data_mod.dataset_name(cfg["data"]), cfg["methods"], cfg["seeds"],
                                     cfg["evaluate"]["baselines"], out_dir, provenance=prov)
    parent = run.parent()  # the pipeline run: where the UI shows the comparison first
    for name in ("report.html", "report.md", "summary.csv"):
        run.artifact(out_dir / name)
        parent.artifact(out_dir / name, "report")
    for png in sorted((out_dir / "figures").glob("*.png")):  # report.md's pictures, linked relatively
        parent.artifact(png, "report/figures")
    summary = {f"{r['name']}.{m}_mean": r[f"{m}_mean"] for r in result["rows"] for m in ("linear_top1", "knn_top1")
               if r.get(f"{m}_mean") is not None}
    for c in result["comparisons"]:
        if c["metric"] == "linear_top1":
            summary.update({f"{c['method']}.linear_top1_vs_{c['baseline']}_{k}": c[k] for k in ("diff", "lo", "hi")})
    parent.log(summary)
    say(f"report: {len(cfg['methods'])} method(s) x {len(cfg['seeds'])} seed(s), "
        f"{len(cfg['evaluate']['baselines'])} baseline(s); linear top-1 (mean over seeds):")
    for i, r in enumerate(result["rows"], 1):
        say(f"  {i}. {r['name']:<12} {r['kind']:<9} {pct(r['linear_top1_mean'])}")
    say(f"beat every baseline: {', '.join(result['beat_all_baselines']) or 'none'}; "
        f"wrote {out_dir}/report.html, report.md, summary.csv")
    return result
