"""Memorisation audit of the evaluate report: samples -> nearest training / held-out volumes.

Where it sits: in the evaluate stage (eval/evaluate.py), after the metrics. For every sample,
its nearest training volume and nearest held-out volume, in voxel space and, for the slice
VAE, in latent space (`slicevae.density.memorisation_audit`); the fraction of samples nearer
the training set than the held-out set, beside the same statistic for the held-out volumes;
the three closest sample–training pairs as one PNG. A model that copies its training subjects
shows here.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from slicevae_jax import viz
from slicevae_jax.data.cache import VolumeCache
from slicevae_jax.slicevae import density
from slicevae_jax.slicevae import density_stages
from slicevae_jax.slicevae import inference


class _TrainVolumes:
  """The cache's training volumes as a read-on-demand sequence (for `density._nearest`)."""

  def __init__(self, cache: VolumeCache):
    self.cache, self.ids = cache, cache.split("train")

  def __len__(self) -> int:
    return len(self.ids)

  def __getitem__(self, i: int) -> np.ndarray:
    return self.cache.volume(self.ids[i])


def audit_workdir(cache: VolumeCache, samples: np.ndarray, real: np.ndarray,
                  bundle: inference.InferenceBundle | None, out_dir: str) -> dict[str, Any]:
  """`density.memorisation_audit` of the samples against the cache; the closest-pairs PNG.

  Latent-space distances when `bundle` (a slice VAE) is given; training volumes are read
  and encoded a few at a time. Writes <out_dir>/memorisation_pairs.png and returns the
  audit with subject ids in place of indices.
  """
  train = _TrainVolumes(cache)
  latents = None
  if bundle is not None:
    chunk = max(int(bundle.config.latent.encode_batch), 1) * 4
    y_train = np.concatenate([density.encode_volumes(bundle, np.stack(
        [train[i] for i in range(s, min(s + chunk, len(train)))]))
                              for s in range(0, len(train), chunk)])
    latents = {"samples": density.encode_volumes(bundle, samples), "train": y_train,
               "heldout": density.encode_volumes(bundle, real)}
  audit = density.memorisation_audit(samples, train, real, latents)
  ids = [cache.subjects[i]["id"] for i in train.ids]
  val_ids = [cache.subjects[i]["id"] for i in cache.split("val")]
  vox = audit["voxel"]
  closest = np.argsort(vox["d_train"])[:3]
  pairs = [v for q in closest for v in (samples[q], train[int(vox["nearest_train"][q])])]
  viz.save_png(os.path.join(out_dir, AUDIT_PNG), _pair_grid(pairs))
  for a in audit.values():
    a["nearest_train"] = [ids[int(j)] for j in a["nearest_train"]]
    a["nearest_heldout"] = [val_ids[int(j)] for j in a["nearest_heldout"]]
  audit["closest_pairs"] = [int(q) for q in closest]
  return audit


AUDIT_PNG = "memorisation_pairs.png"


def _pair_grid(volumes: list[np.ndarray]) -> np.ndarray:
  """Pairs (sample, training volume) of three-plane views: one pair per row, a white gap
  between sample (left) and training volume (right)."""
  left, right = density_stages.strip(volumes[0::2], pad=6), density_stages.strip(volumes[1::2], pad=6)
  return np.concatenate([left, np.full((left.shape[0], 8), 255, np.uint8), right], axis=1)


def audit_markdown(audit: dict[str, Any], sample_names: list[str]) -> list[str]:
  """The evaluate report's 'Memorisation audit' section, as markdown lines."""
  md = ["## Memorisation audit", "",
        "Distances are root-mean-square differences to the nearest training and held-out "
        "volume, in voxel space and in latent space (posterior-mean codes). "
        "*Closer to training*: the share of (sample, held-out volume) pairs in which the "
        "sample lies nearer its nearest training volume than the held-out volume lies to its "
        "own; for held-out volumes against each other it is 0.5, and a model that copies its "
        "training subjects drives it to 1. *Nearer than every held-out*: the share nearer the "
        "training set than any unseen real subject is (reference: each held-out volume "
        "against the others). *Nearer training than held-out*: the share of samples nearer "
        "their nearest training volume than their nearest held-out volume (reference: each "
        "held-out volume with the other held-out volumes). Blurry, mean-like samples lie near "
        "every volume and raise the first two a little; the third compares each sample with "
        "both sets and is not raised by blur. A generative model that reproduces training "
        "subjects is a privacy problem: values well above their references call for a look "
        "at the pairs below.", "",
        "| space | closer to training: samples | held-out reference | nearer than every "
        "held-out: samples | held-out reference | nearer training than held-out: samples | "
        "held-out reference | median distance to training: samples | held-out |",
        "|---|---|---|---|---|---|---|---|---|"]
  for space in ("voxel", "latent"):
    if space not in audit:
      continue
    a = audit[space]
    md.append(f"| {space} | {a['closer_to_train']:.3f} | {a['closer_to_train_reference']:.3f} "
              f"| {a['below_all_heldout']:.3f} | {a['below_all_heldout_reference']:.3f} | "
              f"{a['nearer_train_than_heldout']:.3f} | "
              f"{a['nearer_train_than_heldout_reference']:.3f} | "
              f"{np.median(a['d_train']):.4g} | {np.median(a['heldout_d_train']):.4g} |")
  md += ["", "| sample | nearest training (voxel RMS) | nearest held-out (voxel RMS) |"
         + (" nearest training (latent) | nearest held-out (latent) |" if "latent" in audit
            else ""), "|---|---|---|" + ("---|---|" if "latent" in audit else "")]
  for q, name in enumerate(sample_names):
    cells = []
    for space in ("voxel", "latent"):
      if space in audit:
        a = audit[space]
        cells += [f"{a['nearest_train'][q]} ({a['d_train'][q]:.4g})",
                  f"{a['nearest_heldout'][q]} ({a['d_heldout'][q]:.4g})"]
    md.append(f"| {name} | " + " | ".join(cells) + " |")
  md += ["", "The three samples closest to a training volume (voxel space), each beside that "
         "training volume (sagittal, coronal, axial mid-slices):", "",
         f"![closest sample-training pairs]({AUDIT_PNG})", ""]
  return md


def audit_summary(audit: dict[str, Any]) -> dict[str, Any]:
  """The audit for metrics.json: statistics and per-sample nearest neighbours, as plain lists."""
  out = {}
  for space, a in audit.items():
    out[space] = ({k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in a.items()}
                  if isinstance(a, dict) else a)
  return out


def audit_report(cache: VolumeCache, samples: np.ndarray, real: np.ndarray,
                 bundle: inference.InferenceBundle | None, out_dir: str,
                 sample_names: list[str]) -> tuple[dict[str, Any], list[str]]:
  """(summary for metrics.json, Markdown lines for report.md) of the samples' audit."""
  os.makedirs(out_dir, exist_ok=True)
  audit = audit_workdir(cache, samples, real, bundle, out_dir)
  return (dict(audit_summary(audit), samples=sample_names),
          audit_markdown(audit, sample_names))
