"""Report: scored rows -> metrics.json, report.md (Table 1), Fig. 4 RAS chart, Fig. 3 overlays.

Last step of the data flow. The rows come from `evaluate` (one per model, plus the 'Real'
row); `write_results` writes one evaluation folder (the rows' figures, the per-pair Dice,
metrics.json and report.md), `write_report` the Markdown report of one or several models,
laid out like the paper's Table 1, with a per-label RAS bar chart like Fig. 4,
segmentation overlays like Fig. 3 and sample montages.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from slicevae_jax import fileio
from slicevae_jax import viz
from slicevae_jax.workdir import METRICS_FILE, RAS_CHART, REPORT_FILE


def write_row_figures(config: ml_collections.ConfigDict, row: dict[str, Any],
                      generated: np.ndarray, gen_labels: np.ndarray, real: np.ndarray,
                      real_labels: np.ndarray, label_names: list[str], out_dir: str) -> None:
  """The row's Fig. 3 overlay and sample montage in out_dir; their names go into the row."""
  e = config.eval
  os.makedirs(out_dir, exist_ok=True)
  slug = _slug(row["name"])
  row["figures"] = {"overlay": f"overlay_{slug}.png", "montage": f"samples_{slug}.png"}
  # write_report links figures relative to its own folder, which may be another one.
  row["figures_dir"] = os.path.abspath(out_dir)
  n = len(generated)
  panels = [(f"{row['name']} {i}", generated[i], gen_labels[i])
            for i in range(min(int(e.num_figures), n))]
  panels.append(("real (true labels)", real[0], real_labels[0]))
  save_overlays(os.path.join(out_dir, row["figures"]["overlay"]), panels, label_names)
  save_montage(os.path.join(out_dir, row["figures"]["montage"]),
               generated[:max(2 * int(e.num_figures), 1)])


def public(real_row: dict[str, Any]) -> dict[str, Any]:
  """The real row without its private arrays (keys starting with '_')."""
  return {k: v for k, v in real_row.items() if not k.startswith("_")}


def write_results(config: ml_collections.ConfigDict,
                  scored: list[tuple[dict[str, Any], dict[str, np.ndarray], np.ndarray]],
                  real_row: dict[str, Any], real: np.ndarray, real_labels: np.ndarray,
                  label_names: list[str], slice_axis: int, out_dir: str,
                  extra: dict[str, Any] | None = None,
                  memorisation: dict[str, Any] | None = None,
                  sections: list[str] | None = None) -> dict[str, Any]:
  """metrics.json, report.md, figures and the per-pair Dice of scored rows, first row first.

  scored: (row, arrays from `score_generated`, the row's volumes) per row.
  memorisation, sections: the memorisation audit's summary for metrics.json and its
  Markdown lines for the end of the report (eval/evaluate.py computes them).
  """
  e = config.eval
  rows = [r for r, _, _ in scored]
  settings = {"eval": plain(e), "seed": int(e.seed), "slice_axis": int(slice_axis)}
  result = {"model": rows[0], "rows": rows, "real": public(real_row),
            "label_names": list(label_names), "settings": settings, "source": dict(extra or {})}
  if memorisation is not None:
    result["memorisation"] = memorisation
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    for row, arrays, volumes in scored:
      write_row_figures(config, row, volumes, arrays["labels"], real, real_labels, label_names,
                        out_dir)
      saved = {"dice_generated": arrays["dice"], "features_generated": arrays["features"]}
      if "_dice" in real_row:
        saved["dice_real_vs_real"] = real_row["_dice"]
      fileio.save_npz(os.path.join(out_dir, f"ras_dice_{_slug(row['name'])}.npz"), **saved)
    fileio.write_json(os.path.join(out_dir, METRICS_FILE), result)
    write_report(rows, result["real"], out_dir, label_names=list(label_names),
                 notes=_notes(settings), sections=sections)
  for row in rows:
    logging.info("%s: MMD %s ± %s, MS-SSIM %s, RAS %s (real-vs-real %s), segmenter FD %s",
                 row["name"], _fmt(row["mmd_kwon"]["mean"]), _fmt(row["mmd_kwon"]["std"]),
                 _fmt(row.get("ms_ssim", {}).get("mean")), _fmt(row["ras"]["mean"]),
                 _fmt(real_row.get("ras", {}).get("mean")),
                 _fmt(row.get("segmenter_fd", {}).get("value")))
  return result


def plain(c: ml_collections.ConfigDict) -> dict[str, Any]:
  """A config group as JSON-able values (tuples as lists), as metrics.json records it."""
  return {k: (list(v) if isinstance(v, tuple) else v) for k, v in c.to_dict().items()}


def _slug(name: str) -> str:
  return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name) or "model"


def _fmt(v: Any, digits: int = 4) -> str:
  if v is None or (isinstance(v, float) and not np.isfinite(v)):
    return "n/a"
  return f"{v:.{digits}f}"


def _notes(settings: dict[str, Any]) -> list[str]:
  e = settings["eval"]
  return [
      f"Registration: affine, {e['reg_levels']} levels, {e['reg_iters']} Adam steps, "
      f"lr {e['reg_lr']}, similarity {e['similarity']}"
      + (f", finest level on every {e['reg_fine_stride']}th voxel per axis."
         if int(e.get("reg_fine_stride", 1)) > 1 else "."),
      f"MMD (Kwon): linear kernel on voxels in [-1, 1], batch {e['mmd_batch']} (lowered to "
      f"the number of real volumes if fewer), {e['mmd_repeats']} passes; a sum over voxels, "
      f"not comparable across grids. MS-SSIM over {e['msssim_pairs']} random distinct pairs.",
  ]


# ---------------------------------------------------------------------------------------------
# Pictures.


def _save_figure(fig: Any, path: str) -> None:
  plt = viz.pyplot()
  with fileio.atomic_path(path, suffix=".png") as tmp:
    fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
  plt.close(fig)


def _planes(volume: np.ndarray) -> list[np.ndarray]:
  """Mid coronal and mid axial slices of a RAS [X, Y, Z] array, superior/anterior up."""
  _, y, z = (s // 2 for s in volume.shape)
  return [np.rot90(volume[:, y, :]), np.rot90(volume[:, :, z])]


def save_overlays(path: str, panels: list[tuple[str, np.ndarray, np.ndarray]],
                  label_names: list[str]) -> None:
  """Fig. 3: mid coronal and axial slices with labels as a colour overlay, one column each.

  panels: (title, volume [X, Y, Z] in [0, 1], labels [X, Y, Z]); background is left clear.
  """
  plt = viz.pyplot()
  cols = len(panels)
  fig, axes = plt.subplots(2, cols, figsize=(2.2 * cols, 4.6), squeeze=False)
  cmap = plt.get_cmap("tab20", max(len(label_names), 2))
  for j, (title, vol, lab) in enumerate(panels):
    for i, (img, lb) in enumerate(zip(_planes(vol), _planes(lab))):
      ax = axes[i, j]
      ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0)
      ax.imshow(np.ma.masked_equal(lb, 0), cmap=cmap, vmin=0, vmax=len(label_names) - 1,
                alpha=0.45, interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(title, fontsize=8)
    axes[0, 0].set_ylabel("coronal", fontsize=8)
    axes[1, 0].set_ylabel("axial", fontsize=8)
  _save_figure(fig, path)


def save_montage(path: str, volumes: np.ndarray) -> None:
  """Three-plane views (viz.three_planes) of volumes [k, X, Y, Z], one row each, grey PNG."""
  rows = [viz.three_planes(v) for v in volumes]
  # Small grids (32³, 64³) are upscaled by whole voxels so that a row is >= 128 pixels high.
  factor = max(1, -(-128 // rows[0].shape[0]))
  rows = [np.repeat(np.repeat(r, factor, axis=0), factor, axis=1) for r in rows]
  width = max(r.shape[1] for r in rows)
  rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]))) for r in rows]
  viz.save_png(path, np.concatenate(rows, axis=0))


def save_ras_chart(path: str, rows: list[dict[str, Any]], real_row: dict[str, Any] | None,
                   label_names: list[str]) -> None:
  """Fig. 4: RAS (mean Dice) per label, one bar per model, the real-vs-real bound beside."""
  plt = viz.pyplot()
  labels = list(label_names[1:])
  series = [(r["name"], r.get("ras", {}).get("per_label", {}), None) for r in rows]
  if real_row and "ras" in real_row:
    series.append(("Real vs real (upper bound)", real_row["ras"]["per_label"], "//"))
  x = np.arange(len(labels) + 1)                                     # labels, then 'mean'
  width = 0.8 / max(len(series), 1)
  fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(x) * max(len(series), 1) ** 0.5), 3.6))
  for s, (name, per_label, hatch) in enumerate(series):
    vals = [per_label.get(lb) for lb in labels]
    finite = [v for v in vals if v is not None]
    mean = float(np.mean(finite)) if finite else np.nan
    vals = [np.nan if v is None else v for v in vals] + [mean]
    ax.bar(x + (s - (len(series) - 1) / 2) * width, vals, width, label=name, hatch=hatch,
           color="0.75" if hatch else None, edgecolor="0.3" if hatch else None)
  ax.set_xticks(x)
  ax.set_xticklabels(labels + ["mean (RAS)"], rotation=45, ha="right", fontsize=8)
  ax.set_ylim(0.0, 1.0)
  ax.set_ylabel("Dice")
  ax.set_title("Realistic Atlas Score per label")
  # Below the axes, so no bar is hidden (the bars reach 0.9 on most labels).
  ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.36),
            ncol=min(len(series), 3), frameon=False)
  ax.grid(axis="y", alpha=0.3)
  _save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# Report.


def _pm(d: dict[str, Any] | None, digits: int) -> str:
  if not d or d.get("mean") is None:
    return "—" if not d else "n/a (NaN)"
  if d.get("degenerate"):
    return f"{d['mean']:.{digits}f} (one fixed batch: no spread)"
  std = "" if d.get("std") is None else f" ± {d['std']:.{digits}f}"
  return f"{d['mean']:.{digits}f}{std}"


def _value(d: dict[str, Any] | None, key: str, fmt: str) -> str:
  if not d or d.get(key) is None:
    return "—"
  return format(d[key], fmt)


def _mmd_digits(rows: list[dict[str, Any]]) -> int:
  # Table 1 prints MMD as an integer; small grids give values of order 1-100.
  means = [abs(r["mmd_kwon"]["mean"]) for r in rows
           if r.get("mmd_kwon") and r["mmd_kwon"].get("mean") is not None]
  return 0 if means and min(means) >= 100 else 3


def table_markdown(rows: list[dict[str, Any]], real_row: dict[str, Any] | None) -> str:
  """Table 1 as Markdown: one row per model and a 'Real' row, paper columns first."""
  digits = _mmd_digits(rows)
  head = ("| Model | MMD (Kwon) ↓ | MS-SSIM ↓ | MS-SSIM (Kwon) ↓ | RAS ↑ | Gaussian MMD ↓ "
          "| Segmenter FD ↓ |\n|---|---|---|---|---|---|---|\n")
  lines = []
  for r in rows:
    lines.append(f"| {r['name']} | {_pm(r.get('mmd_kwon'), digits)} "
                 f"| {_pm(r.get('ms_ssim'), 4)} | {_pm(r.get('ms_ssim_kwon'), 4)} "
                 f"| {_value(r.get('ras'), 'mean', '.4f')} "
                 f"| {_value(r.get('mmd_gaussian'), 'value', '.4g')} "
                 f"| {_value(r.get('segmenter_fd'), 'value', '.4g')} |")
  if real_row is not None:
    lines.append(f"| Real | — | {_pm(real_row.get('ms_ssim'), 4)} "
                 f"| {_pm(real_row.get('ms_ssim_kwon'), 4)} "
                 f"| {_value(real_row.get('ras'), 'mean', '.4f')} "
                 f"| {_value(real_row.get('mmd_gaussian'), 'value', '.4g')} "
                 f"| {_value(real_row.get('segmenter_fd'), 'value', '.4g')} |")
  return head + "\n".join(lines) + "\n"


def _ras_table(rows: list[dict[str, Any]], real_row: dict[str, Any] | None,
               label_names: list[str]) -> str:
  cols = [r["name"] for r in rows] + (["Real vs real"] if real_row and "ras" in real_row else [])
  per = [r.get("ras", {}).get("per_label", {}) for r in rows]
  if real_row and "ras" in real_row:
    per.append(real_row["ras"]["per_label"])
  out = "| Label | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
  for lb in label_names[1:]:
    out += f"| {lb} | " + " | ".join(_fmt(p.get(lb), 3) for p in per) + " |\n"
  return out


def _reading_notes(rows: list[dict[str, Any]]) -> list[str]:
  """How to read the extra rows: which part of the model limits the samples."""
  kinds = {r.get("kind") for r in rows}
  out = []
  if "latent model" in kinds or "reconstructions" in kinds:
    out += ["Rows below the first score the same trained decoder fed differently: samples of "
            "each latent model fitted on the same checkpoint (the first row is the configured "
            "model's samples), and the held-out volumes' own posterior means decoded "
            "(reconstructions). The reconstructions are what the decoder can do at best: if "
            "they score far from the Real row too, the decoder limits the samples; if they "
            "score close to it and the samples do not, the latent model does.", ""]
  for r in rows:
    rec = r.get("reconstruction")
    if rec:
      out += [f"Reconstruction error of the {rec['num_volumes']} held-out volumes: MSE "
              f"{rec['mse']:.5f}, PSNR {rec['psnr']:.2f} dB (peak 1).", ""]
  return out


def _link(row: dict[str, Any], filename: str, out_dir: str) -> str:
  """A figure's path relative to the report's folder."""
  folder = row.get("figures_dir")
  if not folder:
    return filename
  return os.path.relpath(os.path.join(folder, filename), os.path.abspath(out_dir))


# A label whose real-vs-real RAS Dice is below this is one the segmenter does not find on
# real volumes (a well-trained one scores 0.4-0.9 per label after affine registration).
MISSED_DICE = 0.1


def missed_labels(real_row: dict[str, Any] | None) -> list[str]:
  """Labels of the Real row's RAS below MISSED_DICE: structures the segmenter misses."""
  per = ((real_row or {}).get("ras") or {}).get("per_label") or {}
  return [name for name, v in per.items() if v is not None and v < MISSED_DICE]


def warn_missed_labels(real_row: dict[str, Any] | None) -> None:
  """Logs a warning naming the labels the segmenter misses on real volumes, if any."""
  missed = missed_labels(real_row)
  if missed:
    logging.warning("the RAS segmenter misses %s on real volumes (real-vs-real Dice < %g): "
                    "RAS says nothing about them; train it longer or with "
                    "segmenter.loss='dice_ce'", ", ".join(missed), MISSED_DICE)


def _segmenter_warning(real_row: dict[str, Any] | None) -> list[str]:
  missed = missed_labels(real_row)
  if not missed:
    return []
  return [f"**The RAS segmenter misses {len(missed)} label(s) on real volumes**: "
          f"{', '.join(missed)} score below {MISSED_DICE} Dice from real to real. Every "
          "row's RAS (and the Real row's bound) is lowered by them and says nothing about "
          "those structures. Train the segmenter longer or with `segmenter.loss='dice_ce'` "
          "(delete `segmenter/` in the workdir to retrain it).", ""]


def write_report(results: list[dict[str, Any]], real_row: dict[str, Any] | None, out_dir: str,
                 *, label_names: list[str] | None = None, title: str = "Evaluation",
                 notes: list[str] | None = None, sections: list[str] | None = None) -> str:
  """Writes out_dir/report.md and out_dir/ras_per_label.png for one or several models.

  Args:
    results: one row per model, as `evaluate_volumes(...)['model']`; a row's 'figures'
      entry ({'overlay', 'montage'}: file names in its 'figures_dir', default out_dir) adds
      its pictures, linked relative to out_dir.
    real_row: `evaluate_volumes(...)['real']` (MS-SSIM of real pairs, RAS upper bound) or
      None.
    out_dir: output folder of report.md and the RAS chart.
    label_names: K names, background first (default: from the rows' RAS entries).
    title, notes: heading and bullet points under the table.
    sections: Markdown lines appended at the end (the memorisation audit).
  Returns:
    The report's path.
  """
  if not results:
    raise ValueError("write_report needs at least one model row")
  if label_names is None:
    label_names = ["background"] + list(results[0].get("ras", {}).get("per_label", {}))
  grid = results[0].get("grid")
  md = [f"# {title}", ""]
  if grid:
    md += [f"Grid {'×'.join(str(g) for g in grid)}; "
           + ", ".join(f"{r['name']}: {r.get('num_generated', '?')} generated" for r in results)
           + f"; {results[0].get('num_real', '?')} real held-out volumes.", ""]
  md += ["## Table 1", "", table_markdown(results, real_row)]
  md += _segmenter_warning(real_row)
  md += _reading_notes(results)
  md += [
      "MMD (Kwon): Kwon et al.'s minibatch MMD, mean ± std over passes (lower is closer to "
      "the real distribution); with as many generated volumes as one batch, every pass sees "
      "the same generated batch and the std measures only how the real set was cut, the same "
      "for every row. MS-SSIM: mean ± std over random pairs of one set (lower is more "
      "diverse; a set as diverse as the real one scores like the Real row, and far above it "
      "means near-copies); 'Kwon' is the reference formula with its last-scale exponent, for "
      "comparison with the paper, the other column the correct five-scale form. RAS: mean "
      "Dice over labels (background excluded) of each volume's U-Net segmentation, affinely "
      "registered to each volume of the real set's second half; it scores anatomy, not "
      "diversity (a set of near-identical average brains can score well). Gaussian MMD: normalised, unbiased, median-heuristic bandwidth. "
      "Segmenter FD: Fréchet distance of our RAS U-Net's bottleneck features — a 3D stand-in "
      "for FID, not an FID.",
      "",
      "The Real row: MS-SSIM between pairs of real volumes; RAS from one half of the real set "
      "(segmented by the U-Net, like generated volumes) to the other half, the upper bound of "
      "the protocol; Gaussian MMD and segmenter FD between the two halves (fewer volumes, so "
      "more finite-sample bias).",
      ""]
  for note in notes or []:
    md.append(f"- {note}")
  if notes:
    md.append("")
  chart = os.path.join(out_dir, RAS_CHART)
  save_ras_chart(chart, results, real_row, label_names)
  md += ["## Realistic Atlas Score per label (Fig. 4)", "", f"![RAS per label]({RAS_CHART})",
         "", _ras_table(results, real_row, label_names)]
  for r in results:
    figs = {k: _link(r, f, out_dir) for k, f in (r.get("figures") or {}).items()}
    if figs.get("overlay"):
      md += [f"## Segmentations: {r['name']} (Fig. 3)", "",
             "Mid coronal (top) and axial (bottom) slices with the U-Net's labels; the last "
             "column is a real volume with its true labels.", "",
             f"![segmentations of {r['name']}]({figs['overlay']})", ""]
    if figs.get("montage"):
      md += [f"## Samples: {r['name']}", "", "Sagittal, coronal and axial mid-slices.", "",
             f"![samples of {r['name']}]({figs['montage']})", ""]
  md += sections or []
  path = os.path.join(out_dir, REPORT_FILE)
  fileio.write_text(path, "\n".join(md))
  return path
