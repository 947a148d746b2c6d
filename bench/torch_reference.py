r"""PyTorch reference of the slice VAE, for timing the JAX code against (bench only).

The network of slicevae_jax/models/slice_vae.py, its loss (slicevae/losses.py) and its
optimiser (Adam, lr 1e-3), written the way a PyTorch user would write them: NCHW float32,
plain nn.Module, nn.Conv2d / nn.BatchNorm2d / F.leaky_relu / nearest F.interpolate, a
standard zero_grad / forward / loss / backward / step loop. `load_flax_variables` copies a
flax variables dict {'params', 'batch_stats'} of slice_vae.SliceVAE into it (HWIO kernels
-> OIHW, BatchNorm scale/bias/mean/var), so both frameworks can run the same weights.

  pip install -r bench/requirements.txt
  python bench/torch_reference.py --check            # 64² (batch 8), 128² (4), 256² (2)
  python bench/torch_reference.py --check --res 64

--check builds both models from configs/hcp{res}.py with the same (perturbed) weights and
asserts that they agree to float32 tolerance (--tol, relative to max(1, max |value|)): the
train-mode forward (batch statistics, the same reparameterisation noise), the loss, the
updated running means and variances, and the eval-mode decode (running averages); it prints
the largest differences and both parameter counts (about 3.3 M at every resolution). The
gradients of every parameter are judged against a float64 copy of the torch model (--grad-tol,
per leaf): float32 gradients of this summed loss through train-mode BatchNorm carry rounding
of 1e-4 to 1e-3 in both frameworks, and torch's float32 CPU gradients up to a few percent at
256² (its BatchNorm sums over B·H·W lose digits), so float32 against float32 would say little.
The stride-2 convolutions (padding 1 in both, symmetric) are covered by the encoder's outputs.

Two known differences, neither in the network's outputs: BatchNorm's running variance, which
torch updates with the unbiased batch variance (n / (n - 1) times flax's biased one; the
check takes that factor out), and the non-finite guard of the project's training step, which
the plain torch loop does not have. Only bench/ imports torch: the package and the tests
never do.
"""

import argparse
import copy
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
# Batches of the --check at each resolution (small: it runs on a CPU in seconds).
CHECK_BATCH = {64: 8, 128: 4, 256: 2}


class ConvBN(nn.Module):
  """3x3 conv (bias, padding 1) -> BatchNorm2d -> optional LeakyReLU(0.2)."""

  def __init__(self, c_in: int, c_out: int, stride: int = 1, activate: bool = True,
               momentum: float = 0.1):
    super().__init__()
    self.conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
    self.bn = nn.BatchNorm2d(c_out, eps=1e-5, momentum=momentum)
    self.activate = activate

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.bn(self.conv(x))
    return F.leaky_relu(x, 0.2) if self.activate else x


class ResDown(nn.Module):
  """Halves H and W. main: conv(s2) BN LReLU conv BN LReLU; skip: conv(s2) BN LReLU."""

  def __init__(self, c_in: int, c_out: int, activate: bool = True, momentum: float = 0.1):
    super().__init__()
    self.main1 = ConvBN(c_in, c_in, stride=2, momentum=momentum)
    self.main2 = ConvBN(c_in, c_out, activate=activate, momentum=momentum)
    self.skip = ConvBN(c_in, c_out, stride=2, activate=activate, momentum=momentum)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.main2(self.main1(x)) + self.skip(x)


def upsample2(x: torch.Tensor) -> torch.Tensor:
  """Nearest-neighbour x2 on [B, C, H, W]."""
  return F.interpolate(x, scale_factor=2, mode="nearest")


class ResUp(nn.Module):
  """Doubles H and W; each path's first conv runs before the upsampling, as in slice_vae.py."""

  def __init__(self, c_in: int, c_out: int, skip_double_lrelu: bool = False,
               momentum: float = 0.1):
    super().__init__()
    self.conv1 = nn.Conv2d(c_in, c_in, 3, padding=1)
    self.bn1 = nn.BatchNorm2d(c_in, eps=1e-5, momentum=momentum)
    self.main2 = ConvBN(c_in, c_out, momentum=momentum)
    self.skip_conv = nn.Conv2d(c_in, c_out, 3, padding=1)
    self.skip_bn = nn.BatchNorm2d(c_out, eps=1e-5, momentum=momentum)
    self.skip_double_lrelu = skip_double_lrelu

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h = F.leaky_relu(self.bn1(upsample2(self.conv1(x))), 0.2)
    h = self.main2(h)
    skip = self.skip_bn(upsample2(self.skip_conv(x)))
    if self.skip_double_lrelu:
      skip = F.leaky_relu(F.leaky_relu(skip, 0.04), 0.04)
    else:
      skip = F.leaky_relu(skip, 0.2)
    return h + skip


class SliceVAE(nn.Module):
  """Slice VAE on NCHW slices [B, 1, H, W] <-> latents [B, 256, 2, 2].

  forward(x, eps=None) -> (x_hat, mu, logvar); eps (same shape as mu) defaults to
  torch.randn_like(mu). train() / eval() switch BatchNorm between batch statistics and
  running averages, as usual in PyTorch (slice_vae.py's bn_mode 'running').
  """

  def __init__(self, slice_size: int, base_width: int = 16, max_width: int = 128,
               latent_channels: int = 256, latent_size: int = 2, momentum: float = 0.1,
               skip_double_lrelu: bool = False):
    super().__init__()
    # The project's own rule for the encoder widths (a pure function; importing it does not
    # start any JAX backend).
    from slicevae_jax.models.slice_vae import stage_widths  # pylint: disable=import-outside-toplevel
    widths = stage_widths(slice_size, base_width, max_width, latent_size)
    self.widths = widths
    self.stem = ConvBN(1, base_width, momentum=momentum)
    chans = [base_width] + widths
    self.down = nn.ModuleList(ResDown(a, b, momentum=momentum)
                              for a, b in zip(chans[:-1], chans[1:]))
    self.mu_head = ResDown(chans[-1], latent_channels, activate=False, momentum=momentum)
    self.logvar_head = ResDown(chans[-1], latent_channels, activate=False, momentum=momentum)
    up = [latent_channels] + list(reversed(widths)) + [base_width]
    self.up = nn.ModuleList(ResUp(a, b, skip_double_lrelu, momentum=momentum)
                            for a, b in zip(up[:-1], up[1:]))
    self.out_block = ConvBN(base_width, base_width, momentum=momentum)
    self.out_conv = nn.Conv2d(base_width, 1, 3, padding=1)

  def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = self.stem(x)
    for block in self.down:
      h = block(h)
    return self.mu_head(h), self.logvar_head(h)

  def decode(self, z: torch.Tensor) -> torch.Tensor:
    h = z
    for block in self.up:
      h = block(h)
    return self.out_conv(self.out_block(h))

  def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None):
    mu, logvar = self.encode(x)
    if eps is None:
      eps = torch.randn_like(mu)
    z = mu + torch.exp(0.5 * logvar) * eps
    return self.decode(z), mu, logvar


def from_config(config) -> SliceVAE:
  """The torch model of `config.model` for slices of `config.data.grid` (float32 only)."""
  m = config.model
  if m.dtype != "float32":
    raise ValueError(f"the torch reference is float32 only, config has model.dtype {m.dtype!r}")
  return SliceVAE(int(config.data.grid), base_width=int(m.base_width),
                  max_width=int(m.max_width), latent_channels=int(m.latent_channels),
                  latent_size=int(m.latent_size), momentum=1.0 - float(m.bn_momentum),
                  skip_double_lrelu=bool(m.skip_double_lrelu))


def load_config(res: int):
  """configs/hcp{res}.py (through config_lib, which does not import JAX)."""
  from slicevae_jax import config_lib  # pylint: disable=import-outside-toplevel
  return config_lib.load_module(os.path.join(ROOT, "configs", f"hcp{res}.py")).get_config()


def vae_loss(x_hat: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
             kl_weight: float = 0.2) -> torch.Tensor:
  """mean over the batch of [Σ_pixels (x̂ − x)² + β Σ_latent KL(N(mu, e^logvar) || N(0, I))]."""
  rec = (x_hat - x).pow(2).flatten(1).sum(1)
  kl = (-0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp())).flatten(1).sum(1)
  return (rec + kl_weight * kl).mean()


def make_optimizer(model: nn.Module, lr: float = 1e-3) -> torch.optim.Optimizer:
  """Adam with torch's defaults (betas 0.9, 0.999, eps 1e-8: optax.adam's too)."""
  return torch.optim.Adam(model.parameters(), lr=lr)


def train_step(model: SliceVAE, opt: torch.optim.Optimizer, x: torch.Tensor,
               kl_weight: float = 0.2) -> torch.Tensor:
  """One standard step: zero_grad, forward, loss, backward, Adam step; returns the loss."""
  opt.zero_grad(set_to_none=True)
  x_hat, mu, logvar = model(x)
  loss = vae_loss(x_hat, x, mu, logvar, kl_weight)
  loss.backward()
  opt.step()
  return loss.detach()


def count_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


# --- flax variables -> torch -----------------------------------------------------

def _conv_pairs(conv: nn.Conv2d, path: tuple):
  yield "params", path + ("kernel",), conv.weight, True
  yield "params", path + ("bias",), conv.bias, False


def _bn_pairs(bn: nn.BatchNorm2d, path: tuple):
  yield "params", path + ("scale",), bn.weight, False
  yield "params", path + ("bias",), bn.bias, False
  yield "batch_stats", path + ("mean",), bn.running_mean, False
  yield "batch_stats", path + ("var",), bn.running_var, False


def _convbn_pairs(m: ConvBN, path: tuple):
  yield from _conv_pairs(m.conv, path + ("Conv_0",))
  yield from _bn_pairs(m.bn, path + ("BatchNorm_0",))


def _resdown_pairs(m: ResDown, path: tuple):
  # Flax names submodules by call order: main conv (s2), main conv, skip conv (s2).
  for i, sub in enumerate((m.main1, m.main2, m.skip)):
    yield from _convbn_pairs(sub, path + (f"ConvBN_{i}",))


def _resup_pairs(m: ResUp, path: tuple):
  yield from _conv_pairs(m.conv1, path + ("Conv_0",))
  yield from _bn_pairs(m.bn1, path + ("BatchNorm_0",))
  yield from _convbn_pairs(m.main2, path + ("ConvBN_0",))
  yield from _conv_pairs(m.skip_conv, path + ("Conv_1",))
  yield from _bn_pairs(m.skip_bn, path + ("BatchNorm_1",))


def flax_pairs(model: SliceVAE):
  """(collection, path in the flax tree, torch tensor, is_kernel) for every flax variable."""
  yield from _convbn_pairs(model.stem, ("stem",))
  for i, block in enumerate(model.down):
    yield from _resdown_pairs(block, (f"down_{i}",))
  yield from _resdown_pairs(model.mu_head, ("mu_head",))
  yield from _resdown_pairs(model.logvar_head, ("logvar_head",))
  for i, block in enumerate(model.up):
    yield from _resup_pairs(block, (f"up_{i}",))
  yield from _convbn_pairs(model.out_block, ("out_block",))
  yield from _conv_pairs(model.out_conv, ("out_conv",))


def _leaf_paths(tree, prefix=()) -> set[tuple]:
  if isinstance(tree, dict) or hasattr(tree, "items"):
    out = set()
    for k, v in tree.items():
      out |= _leaf_paths(v, prefix + (k,))
    return out
  return {prefix}


def _get(tree, path: tuple):
  for k in path:
    tree = tree[k]
  return tree


def to_torch_layout(arr, is_kernel: bool) -> np.ndarray:
  """A flax array as torch lays it out: conv kernels HWIO -> OIHW."""
  a = np.asarray(arr, np.float32)
  return a.transpose(3, 2, 0, 1) if is_kernel else a


def load_flax_variables(model: SliceVAE, variables) -> None:
  """Copies flax slice_vae.SliceVAE variables {'params', 'batch_stats'} into `model`.

  Raises ValueError when a shape differs or a variable on either side has no counterpart.
  """
  seen = set()
  with torch.no_grad():
    for coll, path, tensor, is_kernel in flax_pairs(model):
      value = to_torch_layout(_get(variables[coll], path), is_kernel)
      if tuple(value.shape) != tuple(tensor.shape):
        raise ValueError(f"{coll}/{'/'.join(path)}: flax {value.shape} vs torch "
                         f"{tuple(tensor.shape)}")
      tensor.copy_(torch.from_numpy(np.array(value, np.float32)))
      seen.add((coll,) + path)
  flax_leaves = {(c,) + p for c in ("params", "batch_stats") for p in _leaf_paths(variables[c])}
  if seen != flax_leaves:
    raise ValueError(f"unmatched variables: flax only {sorted(flax_leaves - seen)[:4]}, "
                     f"torch only {sorted(seen - flax_leaves)[:4]}")


def nchw(a) -> torch.Tensor:
  """[B, H, W, C] array -> torch [B, C, H, W] float32."""
  return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
  return t.detach().cpu().numpy().transpose(0, 2, 3, 1)


# --- the check against slice_vae.py ----------------------------------------------

def _perturbed(variables, rng: np.random.Generator):
  """The variables with BatchNorm scale/bias, conv biases and running statistics moved off
  their initial values (1, 0, 0, 1), so that copying them wrongly would show."""
  def walk(tree, name):
    if hasattr(tree, "items"):
      return {k: walk(v, k) for k, v in tree.items()}
    a = np.asarray(tree, np.float32)
    if name == "scale":
      return 1.0 + 0.1 * rng.standard_normal(a.shape).astype(np.float32)
    if name in ("bias", "mean"):
      return 0.1 * rng.standard_normal(a.shape).astype(np.float32)
    if name == "var":
      return rng.uniform(0.5, 2.0, a.shape).astype(np.float32)
    return a
  return {c: walk(variables[c], c) for c in ("params", "batch_stats")}


def _rel(a, b) -> tuple[float, float]:
  """(max |a − b|, that divided by max(1, max |b|))."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  d = float(np.max(np.abs(a - b)))
  return d, d / max(1.0, float(np.max(np.abs(b))))


def check(res: int, batch: int, tol: float = 1e-4, grad_tol: float = 5e-3, seed: int = 0
          ) -> dict:
  """Builds both models at `res` from the same weights and asserts they agree; returns the
  differences (each the largest absolute one, and relative to max(1, max |value|))."""
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  from slicevae_jax.models import slice_vae
  from slicevae_jax.slicevae import losses

  config = load_config(res)
  fmodel = slice_vae.from_config(config)
  tmodel = from_config(config)
  m = config.model
  rng = np.random.default_rng(seed)
  x0 = jnp.zeros((1, res, res, 1), jnp.float32)
  variables = _perturbed(fmodel.init({"params": jax.random.key(seed)}, x0, jax.random.key(0),
                                     train=False), rng)
  load_flax_variables(tmodel, variables)
  n_flax = sum(int(np.size(a)) for a in jax.tree.leaves(variables["params"]))
  n_torch = count_params(tmodel)
  assert n_flax == n_torch, (n_flax, n_torch)
  out = {"res": res, "batch": batch, "params_flax": n_flax, "params_torch": n_torch}

  # Eval-mode decode (running averages), before any train-mode call moves them.
  z = rng.standard_normal((batch, 2, 2, int(m.latent_channels))).astype(np.float32)
  dec_f = slice_vae.apply_inference(fmodel, variables, jnp.asarray(z), "decode")
  tmodel.eval()
  with torch.inference_mode():
    dec_t = nhwc(tmodel.decode(nchw(z)))
  out["decode_eval"] = _rel(dec_t, dec_f)

  # Train-mode forward, loss and gradients with the same reparameterisation noise.
  x = rng.random((batch, res, res, 1)).astype(np.float32)
  key = jax.random.key(seed + 1)
  kl_weight = float(config.train.kl_weight)

  def loss_fn(params):
    (x_hat, mu, logvar), upd = fmodel.apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, jnp.asarray(x), key,
        train=True, mutable=["batch_stats"])
    loss, _ = losses.vae_loss(x_hat, jnp.asarray(x), mu, logvar, kl_weight)
    return loss, (x_hat, mu, logvar, upd["batch_stats"])

  (loss_f, (xh_f, mu_f, lv_f, stats_f)), grads_f = jax.value_and_grad(loss_fn, has_aux=True)(
      variables["params"])
  # flax draws eps = normal(key, mu.shape) inside __call__; the same draw goes to torch.
  eps = np.asarray(jax.random.normal(key, mu_f.shape, mu_f.dtype))
  # A float64 copy as the judge of the gradients: torch's float32 CPU gradients lose digits
  # in long sums (BatchNorm's over B·H·W), so float32 against float32 would be loose.
  t64 = copy.deepcopy(tmodel).double()
  tmodel.train()
  tmodel.zero_grad(set_to_none=True)
  xh_t, mu_t, lv_t = tmodel(nchw(x), nchw(eps))
  loss_t = vae_loss(xh_t, nchw(x), mu_t, lv_t, kl_weight)
  loss_t.backward()
  out["x_hat_train"] = _rel(nhwc(xh_t), xh_f)
  out["mu_train"] = _rel(nhwc(mu_t), mu_f)
  out["logvar_train"] = _rel(nhwc(lv_t), lv_f)
  lf, lt = float(loss_f), float(loss_t.detach())
  out["loss"] = (abs(lt - lf), abs(lt - lf) / max(1.0, abs(lf)))
  t64.train()
  o64 = t64(nchw(x).double(), nchw(eps).double())
  vae_loss(o64[0], nchw(x).double(), o64[1], o64[2], kl_weight).backward()
  grads64 = {path: t.grad.numpy() for coll, path, t, _ in flax_pairs(t64) if coll == "params"}

  # Per leaf, max |g − g64| / max |g64|; conv biases followed by train-mode BatchNorm have a
  # zero gradient up to rounding, so theirs is taken relative to the largest gradient of all.
  grad_f, grad_t, cancelled = 0.0, 0.0, 0.0
  mean_rel, var_rel = 0.0, 0.0
  sizes = _bn_sizes(tmodel, batch, res)
  momentum = 1.0 - float(m.bn_momentum)
  g_max = max(float(np.max(np.abs(g))) for g in grads64.values())
  for coll, path, tensor, is_kernel in flax_pairs(tmodel):
    if coll == "params":
      g64 = grads64[path]
      g_f = to_torch_layout(_get(grads_f, path), is_kernel)
      g_t = tensor.grad.numpy()
      if path[-2].startswith("Conv") and path[-1] == "bias" and path[0] != "out_conv":
        cancelled = max(cancelled, float(np.max(np.abs(g_f - g64))) / g_max)
        continue
      scale = max(float(np.max(np.abs(g64))), 1e-30)
      r = float(np.max(np.abs(g_f - g64))) / scale
      if r > grad_f:
        grad_f, out["grads_worst"] = r, "/".join(path)
      grad_t = max(grad_t, float(np.max(np.abs(g_t - g64))) / scale)
    elif path[-1] == "mean":
      mean_rel = max(mean_rel, _rel(tensor.numpy(), _get(stats_f, path))[1])
    else:
      # torch's running variance uses the unbiased batch variance: undo the n/(n-1).
      h = sizes[path[:-1]]
      old = _get(variables["batch_stats"], path)
      new_t = tensor.numpy()
      batch_var_t = (new_t - (1 - momentum) * old) / momentum
      biased = batch_var_t * (h - 1) / h
      new_as_flax = (1 - momentum) * old + momentum * biased
      var_rel = max(var_rel, _rel(new_as_flax, _get(stats_f, path))[1])
  out["grads_jax_f32_vs_torch_f64"] = grad_f
  out["grads_bn_cancelled_bias"] = cancelled
  out["grads_torch_f32_vs_torch_f64"] = grad_t
  out["running_mean"] = mean_rel
  out["running_var_unbiased_corrected"] = var_rel

  bad = [k for k in ("decode_eval", "x_hat_train", "mu_train", "logvar_train", "loss")
         if out[k][1] > tol]
  bad += [k for k in ("running_mean", "running_var_unbiased_corrected",
                      "grads_bn_cancelled_bias") if out[k] > tol]
  if grad_f > grad_tol:
    bad.append("grads_jax_f32_vs_torch_f64")
  out["ok"] = not bad
  out["failed"] = bad
  return out


def _bn_sizes(model: SliceVAE, batch: int, res: int) -> dict[tuple, int]:
  """flax path of each BatchNorm -> values per channel (B·H·W) it normalises in a forward."""
  paths = {id(t): p[:-1] for c, p, t, _ in flax_pairs(model) if p[-1] == "var"}
  sizes, hooks = {}, []
  for mod in model.modules():
    if isinstance(mod, nn.BatchNorm2d):
      path = paths[id(mod.running_var)]
      hooks.append(mod.register_forward_hook(
          lambda _, inp, __, path=path: sizes.__setitem__(path, inp[0].numel() //
                                                          inp[0].shape[1])))
  was = model.training
  model.eval()
  with torch.no_grad():
    model(torch.zeros(batch, 1, res, res))
  model.train(was)
  for h in hooks:
    h.remove()
  return sizes


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--check", action="store_true",
                 help="compare with slicevae_jax's SliceVAE from the same weights")
  p.add_argument("--res", type=int, nargs="*", default=[64, 128, 256])
  p.add_argument("--tol", type=float, default=1e-4,
                 help="outputs, loss, running statistics: max |diff| / max(1, max |value|)")
  p.add_argument("--grad-tol", type=float, default=5e-3,
                 help="JAX's float32 gradients against torch float64, per leaf relative")
  a = p.parse_args()
  if not a.check:
    for res in a.res:
      print(f"{res}²: {count_params(from_config(load_config(res))):,} parameters")
    return
  torch.manual_seed(0)
  ok = True
  for res in a.res:
    r = check(res, CHECK_BATCH.get(res, 2), a.tol, a.grad_tol)
    ok &= r["ok"]
    print(f"{res}² batch {r['batch']}: params flax {r['params_flax']:,} torch "
          f"{r['params_torch']:,}")
    for k in ("decode_eval", "x_hat_train", "mu_train", "logvar_train", "loss"):
      print(f"  {k:32s} max abs diff {r[k][0]:.3g}  relative {r[k][1]:.3g}")
    for k in ("grads_jax_f32_vs_torch_f64", "grads_bn_cancelled_bias", "running_mean",
              "running_var_unbiased_corrected"):
      print(f"  {k:32s} relative {r[k]:.3g}")
    print(f"  (largest JAX gradient difference at {r.get('grads_worst')}; torch float32 "
          f"against float64, for scale, not checked: {r['grads_torch_f32_vs_torch_f64']:.3g})")
    print("  OK" if r["ok"] else f"  FAILED: {', '.join(r['failed'])}", flush=True)
  if not ok:
    sys.exit(1)


if __name__ == "__main__":
  main()
