"""3D baseline iterations (one cohesive module): volumes -> one step of a model's update schedule.

Kept whole although long: the five schedules (paper §3.1; Kwon et al. 2019) share one
state, one way of running networks with BatchNorm threaded and one update, and read side
by side against the reference notebooks.

Where it sits: whole volumes [B, g, g, g, 1] in [-1, 1] from the cache ->
`Baseline.step(state, x, key)` (pure; the caller jits it with shardings and
donation) -> (new `GANState`, metrics) -> `trainer.run`. The networks are in
`models/gan3d.py` (WGAN-GP, VAE-GAN, α-GAN, α-WGAN) and `models/vae3d.py`
(3D VAE), the loss terms in `losses.py`; `stages.build(config)` assembles one
model with one Adam optimiser per network, and `generate` / `reconstruct` give
volumes for sampling, metrics and picture grids.

One call of `step` is one iteration of the reference's schedule (the public
notebooks of Kwon et al., cyclomon/3dbraingen), each update seeing the
parameters the previous update of the same iteration wrote:

  wgan_gp     critic ×n_critic (1), then generator ×n_gen (5, fresh noise each).
  vae_gan     discriminator, then decoder (G), then encoder (E).
  alpha_gan   encoder+generator jointly, then discriminator, then code discriminator.
  alpha_wgan  encoder+generator jointly, then critic, then code critic.
  vae3d       one Adam step on the negative ELBO.

Differences from the reference, on purpose (each also noted where it happens):
  - One batch per iteration. The α-WGAN notebook draws a second real batch for
    its critic update; here the critic sees the same batch as the E/G update.
  - The WGAN-GP penalty takes the norm of each sample's whole gradient; the
    reference took it per voxel (`gp_per_voxel=True` reproduces that).
  - The α-WGAN code critic gets gradient from its ẑ term; in the reference that
    term was computed while the code critic was frozen, so only −CD(z) and the
    penalty trained it (`code_critic_grad_from_zhat=False` reproduces that).
  - The α-(W)GAN notebooks call the generator's optimiser twice per iteration
    (two Adam steps on one gradient); one step by default, two with
    `double_g_step=True`.
  - VAE-GAN: the reference ran the networks forward once per iteration and let
    the decoder and encoder losses reuse those activations; here the decoder
    loss sees the updated discriminator and the encoder loss the updated
    decoder (same reparameterisation noise).

BatchNorm follows the reference: every network runs in training mode
(batch statistics) in every update, and every forward pass moves its running
averages, which are threaded through the iteration; the forward passes inside
a gradient penalty leave them untouched.
"""

import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from slicevae_jax import config_lib
from slicevae_jax import trainer
from slicevae_jax.baselines import losses
from slicevae_jax.slicevae import losses as vae_losses

Array = jax.Array

MODELS = tuple(m for m in config_lib.MODEL_TYPES if m != "slice_vae")
WITH_ENCODER = ("vae_gan", "alpha_gan", "alpha_wgan", "vae3d")

# Updates per iteration in the reference notebooks, (critic, generator):
# WGAN_ADNI_train.ipynb trains D once then G five times ('for iters in range(5)');
# the α-(W)GAN notebooks set g_iter = d_iter = cd_iter = 1; VAE-GAN is one of each.
DEFAULT_UPDATES = {"wgan_gp": (1, 5), "vae_gan": (1, 1), "alpha_gan": (1, 1),
                   "alpha_wgan": (1, 1), "vae3d": (1, 1)}

# Metrics worth a place in the log line, per model.
LOG_KEYS = {
    "wgan_gp": ("loss", "d_loss", "gp", "wasserstein"),
    "vae_gan": ("loss", "d_loss", "recon", "kl"),
    "alpha_gan": ("loss", "d_loss", "cd_loss", "recon"),
    "alpha_wgan": ("loss", "d_loss", "cd_loss", "recon"),
    "vae3d": ("loss", "recon", "kl"),
}

@flax.struct.dataclass
class GANState:
  """Every network of one baseline and its optimiser, as one pytree.

  params, batch_stats and opt_state are dicts keyed by network name ('G', 'D',
  'E', 'CD'; 'VAE' for the 3D VAE). A network without BatchNorm has {} in
  batch_stats.
  """
  step: jax.Array
  params: dict[str, Any]
  batch_stats: dict[str, Any]
  opt_state: dict[str, Any]

  def variables(self, name: str) -> dict[str, Any]:
    """Flax variables of one network."""
    return _variables(self.params[name], self.batch_stats[name])


# --------------------------------------------------------------------------
# Running networks with BatchNorm threaded
# --------------------------------------------------------------------------

def _variables(params, stats) -> dict[str, Any]:
  return {"params": params, "batch_stats": stats} if stats else {"params": params}


def _apply(module: nn.Module, params, stats, *args, train: bool, method: str | None = None):
  """(output, new batch_stats); training mode updates the running averages."""
  kw = {} if method is None else {"method": method}
  variables = _variables(params, stats)
  if train and stats:
    out, updates = module.apply(variables, *args, train=True, mutable=["batch_stats"], **kw)
    return out, updates["batch_stats"]
  return module.apply(variables, *args, train=train, **kw), stats


class _Runner:
  """Training-mode forward passes over a set of parameters, collecting new running stats.

  Lives only inside one traced function: `run('G', z)` applies G and records its
  updated batch_stats in `run.stats`; `run.frozen('D')` is D as a function of
  its input that leaves the running stats alone (for gradient penalties).
  """

  def __init__(self, nets: dict[str, nn.Module], params: dict[str, Any],
               stats: dict[str, Any]):
    self.nets, self.params, self.stats = nets, params, dict(stats)

  def __call__(self, name: str, *args, method: str | None = None):
    out, self.stats[name] = _apply(self.nets[name], self.params[name], self.stats[name], *args,
                                   train=True, method=method)
    return out

  def frozen(self, name: str) -> Callable[[Array], Array]:
    module, params, stats = self.nets[name], self.params[name], self.stats[name]
    return lambda v: _apply(module, params, stats, v, train=True)[0]


@flax.struct.dataclass
class _Carry:
  """What flows between the updates of one iteration."""
  params: dict[str, Any]
  stats: dict[str, Any]
  opt_state: dict[str, Any]
  finite: jax.Array
  metrics: dict[str, Array]


def _repeat(n: int, body: Callable[[int, _Carry], _Carry], carry: _Carry) -> _Carry:
  """body applied n times (index 0..n-1); the first call fixes the metric keys, a loop does the rest."""
  carry = body(0, carry)
  if n > 1:
    carry = jax.lax.fori_loop(1, n, body, carry)
  return carry


def _mean(x: Array) -> Array:
  return jnp.mean(x.astype(jnp.float32))


# --------------------------------------------------------------------------
# The baseline
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Baseline:
  """One 3D baseline: its networks, optimisers, update schedule and samplers.

  Attributes:
    name: one of MODELS.
    nets: network name -> Flax module ('G', 'D', 'E', 'CD'; 'VAE').
    latent_dim: size of the prior sample z.
    txs: network name -> its optax Adam.
    grid: volume side g.
    n_critic, n_gen: updates per iteration (see `updates_per_iteration`).
    gp_weight: λ of every gradient penalty.
    recon_weight: α-(W)GAN L1 weight; VAE-GAN encoder MSE weight.
    dec_recon_weight: VAE-GAN decoder MSE weight.
    kl_weight: 3D VAE KL weight.
    gp_per_voxel: WGAN-GP's penalty norm per voxel (reference bug) instead of per sample.
    code_critic_grad_from_zhat: α-WGAN code critic trained on its CD(ẑ) term too.
    double_g_step: α-(W)GAN generator takes two Adam steps on one gradient (reference).
  """
  name: str
  nets: dict[str, nn.Module]
  latent_dim: int
  txs: dict[str, optax.GradientTransformation]
  grid: int
  n_critic: int = 1
  n_gen: int = 1
  gp_weight: float = 10.0
  recon_weight: float = 10.0
  dec_recon_weight: float = 20.0
  kl_weight: float = 1.0
  gp_per_voxel: bool = False
  code_critic_grad_from_zhat: bool = True
  double_g_step: bool = False

  @property
  def has_encoder(self) -> bool:
    return self.name in WITH_ENCODER

  @property
  def log_keys(self) -> tuple[str, ...]:
    return LOG_KEYS[self.name]

  # ---- state --------------------------------------------------------------

  def init(self, key: jax.Array) -> GANState:
    """All networks initialised on zeros (train=False) and one Adam state each."""
    g, lat = self.grid, self.latent_dim
    vol = jnp.zeros((1, g, g, g, 1), jnp.float32)
    code = jnp.zeros((1, lat), jnp.float32)
    params, stats, opt = {}, {}, {}
    for i, (name, net) in enumerate(sorted(self.nets.items())):
      k = jax.random.fold_in(key, i)
      if name == "VAE":
        v = net.init({"params": k}, vol, jax.random.key(0), train=False)
      else:
        v = net.init({"params": k}, code if name in ("G", "CD") else vol, train=False)
      params[name] = v["params"]
      stats[name] = v.get("batch_stats", {})
      opt[name] = self.txs[name].init(params[name])
    return GANState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                    opt_state=opt)

  def sample_latent(self, key: jax.Array, n: int) -> Array:
    """z ~ N(0, I): [n, latent_dim] float32."""
    return jax.random.normal(key, (n, self.latent_dim), jnp.float32)

  def _params_stats(self, state_or_variables) -> tuple[dict, dict]:
    if isinstance(state_or_variables, GANState):
      return state_or_variables.params, state_or_variables.batch_stats
    return state_or_variables["params"], state_or_variables["batch_stats"]

  def generate(self, state_or_variables, z: Array) -> Array:
    """Decode prior samples z [B, latent_dim] -> volumes [B, g, g, g, 1] float32 (inference BN).

    `state_or_variables`: a GANState, or {'params': {...}, 'batch_stats': {...}}
    keyed by network name.
    """
    params, stats = self._params_stats(state_or_variables)
    if self.name == "vae3d":
      x, _ = _apply(self.nets["VAE"], params["VAE"], stats["VAE"], z, train=False,
                    method="decode")
    else:
      x, _ = _apply(self.nets["G"], params["G"], stats["G"], z, train=False)
    return x.astype(jnp.float32)

  def reconstruct(self, state_or_variables, x: Array) -> Array | None:
    """x [B, g, g, g, 1] -> its reconstruction through the encoder (posterior mean), or None.

    α-(W)GAN: G(E(x)); VAE-GAN: G(μ(x)); 3D VAE: decode(μ(x)); WGAN-GP has no
    encoder and returns None.
    """
    if not self.has_encoder:
      return None
    params, stats = self._params_stats(state_or_variables)
    run = lambda name, *a, method=None: _apply(self.nets[name], params[name], stats[name], *a,
                                                train=False, method=method)[0]
    if self.name == "vae3d":
      mu, _ = run("VAE", x, method="encode")
      return run("VAE", mu, method="decode").astype(jnp.float32)
    code = run("E", x)
    if self.name == "vae_gan":
      code = code[0]
    return run("G", code).astype(jnp.float32)

  # ---- one training iteration ----------------------------------------------

  def step(self, state: GANState, x: Array, key: jax.Array) -> tuple[GANState, dict[str, Array]]:
    """One full iteration of this model's update schedule (pure; jit it outside).

    Args:
      state: the GANState.
      x: real volumes [B, g, g, g, 1] in [-1, 1].
      key: the training stream; this step uses fold_in(key, state.step).
    Returns:
      (new state, metrics): float32 scalars, 'loss' (the generator/encoder-side
      total), the component losses, and 'finite' (1.0 when every loss and
      gradient was finite). A non-finite iteration leaves the state as it was
      except for step + 1.
    """
    key = jax.random.fold_in(key, state.step)
    x = x.astype(jnp.float32)
    carry = _Carry(params=dict(state.params), stats=dict(state.batch_stats),
                   opt_state=dict(state.opt_state), finite=jnp.array(True), metrics={})
    schedule = {"wgan_gp": self._wgan_gp, "vae_gan": self._vae_gan,
                "alpha_gan": self._alpha_gan, "alpha_wgan": self._alpha_wgan,
                "vae3d": self._vae3d}[self.name]
    carry = schedule(carry, x, key)
    new = GANState(step=state.step + 1, params=carry.params, batch_stats=carry.stats,
                   opt_state=carry.opt_state)
    new = trainer.guard(state, new, carry.finite)
    metrics = {k: v.astype(jnp.float32) for k, v in carry.metrics.items()}
    metrics["finite"] = carry.finite.astype(jnp.float32)
    return new, metrics

  def _update(self, c: _Carry, names: tuple[str, ...],
              loss_fn: Callable[[_Runner], tuple[Array, dict[str, Array]]]) -> _Carry:
    """One Adam step of the networks `names` on loss_fn(run) -> (loss, metrics).

    The loss is differentiated with respect to those networks' parameters only;
    every other network is a constant. Running stats of all networks the loss
    ran are carried on.
    """
    def wrapped(p):
      run = _Runner(self.nets, {**c.params, **p}, c.stats)
      loss, metrics = loss_fn(run)
      return loss, (metrics, run.stats)

    (loss, (metrics, stats)), grads = jax.value_and_grad(wrapped, has_aux=True)(
        {n: c.params[n] for n in names})
    params, opt = dict(c.params), dict(c.opt_state)
    double = self.double_g_step and self.name in ("alpha_gan", "alpha_wgan")
    for n in names:
      for _ in range(2 if double and n == "G" else 1):
        upd, opt[n] = self.txs[n].update(grads[n], opt[n], params[n])
        params[n] = optax.apply_updates(params[n], upd)
    finite = (c.finite & jnp.isfinite(loss) & trainer.all_finite(grads)
              & trainer.all_finite(metrics))
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    return c.replace(params=params, stats=stats, opt_state=opt, finite=finite,
                     metrics={**c.metrics, **metrics})

  def _forward(self, c: _Carry, fn: Callable[[_Runner], Any]) -> tuple[_Carry, Any]:
    """Runs fn(run) outside any gradient (fakes for a critic update); outputs are constants."""
    run = _Runner(self.nets, c.params, c.stats)
    out = jax.tree.map(jax.lax.stop_gradient, fn(run))
    return c.replace(stats=run.stats), out

  # WGAN-GP: WGAN_ADNI_train.ipynb, training cell. Per iteration: the critic once
  # on d_loss = −D(x) + D(G(z)) + 10·GP (GP norm along dim=1, i.e. per voxel),
  # then the generator five times on −D(G(z)), fresh noise each time.
  def _wgan_gp(self, c: _Carry, x: Array, key: jax.Array) -> _Carry:
    b = x.shape[0]
    k_d, k_g = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)

    def critic(i, c):
      kz, kgp = jax.random.split(jax.random.fold_in(k_d, i))
      c, fake = self._forward(c, lambda run: run("G", self.sample_latent(kz, b)))

      def loss_fn(run):
        d_real = _mean(run("D", x))
        d_fake = _mean(run("D", fake))
        gp = losses.gradient_penalty(run.frozen("D"), x, fake, kgp, self.gp_per_voxel)
        d_loss = d_fake - d_real + self.gp_weight * gp
        return d_loss, {"d_loss": d_loss, "gp": gp, "wasserstein": d_real - d_fake}
      return self._update(c, ("D",), loss_fn)

    def generator(i, c):
      z = self.sample_latent(jax.random.fold_in(k_g, i), b)

      def loss_fn(run):
        g_loss = -_mean(run("D", run("G", z)))
        return g_loss, {"loss": g_loss, "g_loss": g_loss}
      return self._update(c, ("G",), loss_fn)

    c = _repeat(self.n_critic, critic, c)
    return _repeat(self.n_gen, generator, c)

  # VAE-GAN: VAEGAN_ADNI_train.ipynb, training cell. One forward pass
  # (μ, log σ², code = μ + σ·ε) = E(x), x̃ = G(code), x_p = G(z); then
  #   D:  BCE(D(x), 1) + BCE(D(x̃), 0) + BCE(D(x_p), 0)
  #   G:  20·mean (x̃ − x)² − [the same three BCE terms with the updated D]
  #       (Larsen et al.'s γ·L_llike − L_GAN: the decoder maximises D's loss)
  #   E:  mean KL (sum / numel) + 10·mean (x̃ − x)²
  # lr 1e-4 for all three. Here the G and E losses recompute their forward pass
  # with the parameters updated just before (the reference reused the first
  # pass); the reparameterisation noise and z stay the same within an iteration.
  def _vae_gan(self, c: _Carry, x: Array, key: jax.Array) -> _Carry:
    b = x.shape[0]
    k_eps, k_z = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
    z = self.sample_latent(k_z, b)

    def encode(run):
      mu, logvar = run("E", x)
      mu, logvar = mu.astype(jnp.float32), logvar.astype(jnp.float32)
      eps = jax.random.normal(k_eps, mu.shape, jnp.float32)
      return mu, logvar, mu + jnp.exp(0.5 * logvar) * eps

    def fakes(run):
      _, _, code = encode(run)
      return code, run("G", code), run("G", z)

    c, (code, x_rec, x_rand) = self._forward(c, fakes)

    def gan_terms(run, x_rec, x_rand):
      return (losses.bce(run("D", x), 1.0) + losses.bce(run("D", x_rec), 0.0)
              + losses.bce(run("D", x_rand), 0.0))

    def disc(i, c):
      def loss_fn(run):
        d_loss = gan_terms(run, x_rec, x_rand)
        return d_loss, {"d_loss": d_loss}
      return self._update(c, ("D",), loss_fn)

    def decoder(i, c):
      def loss_fn(run):
        rec, rand = run("G", code), run("G", z)
        recon = losses.mse(rec, x)
        dec = self.dec_recon_weight * recon - gan_terms(run, rec, rand)
        return dec, {"dec_loss": dec, "recon": recon}
      return self._update(c, ("G",), loss_fn)

    def encoder(run):
      mu, logvar, code_e = encode(run)
      kl = losses.mean_kl(mu, logvar)
      recon = losses.mse(run("G", code_e), x)
      enc = kl + self.recon_weight * recon
      return enc, {"enc_loss": enc, "kl": kl, "enc_recon": recon}

    c = _repeat(self.n_critic, disc, c)
    c = _repeat(self.n_gen, decoder, c)
    c = self._update(c, ("E",), encoder)
    m = c.metrics
    return c.replace(metrics={**m, "loss": m["dec_loss"] + m["enc_loss"]})

  # α-GAN: Alpha_GAN_ADNI_train.ipynb, training cell. Per iteration:
  #   E+G: 10·L1(x̂, x) + BCE(CD(ẑ), 1) + BCE(D(x̂), 1) + BCE(D(G(z)), 1),
  #        ẑ = E(x), x̂ = G(ẑ); e_optimizer.step(), g_optimizer.step() twice;
  #   D:   2·BCE(D(x), 1) + BCE(D(x̂), 0) + BCE(D(G(z')), 0), recomputed with the
  #        updated E and G, fresh z';
  #   CD:  BCE(CD(ẑ), 0) + BCE(CD(z''), 1), ẑ = E(x) recomputed, fresh z''.
  # All four Adams lr 2e-4, torch default betas.
  def _alpha_gan(self, c: _Carry, x: Array, key: jax.Array) -> _Carry:
    b = x.shape[0]
    k_g, k_d, k_cd = (jax.random.fold_in(key, i) for i in range(3))

    def enc_gen(i, c):
      z = self.sample_latent(jax.random.fold_in(k_g, i), b)

      def loss_fn(run):
        z_hat = run("E", x)
        x_hat, x_rand = run("G", z_hat), run("G", z)
        recon = losses.l1(x_hat, x)
        code = losses.bce(run("CD", z_hat), 1.0)
        adv = losses.bce(run("D", x_hat), 1.0) + losses.bce(run("D", x_rand), 1.0)
        total = self.recon_weight * recon + code + adv
        return total, {"loss": total, "recon": recon, "g_adv": adv, "e_code": code}
      return self._update(c, ("E", "G"), loss_fn)

    def disc(i, c):
      z = self.sample_latent(jax.random.fold_in(k_d, i), b)
      c, (x_hat, x_rand) = self._forward(c, lambda run: (run("G", run("E", x)), run("G", z)))

      def loss_fn(run):
        d_loss = (2.0 * losses.bce(run("D", x), 1.0) + losses.bce(run("D", x_hat), 0.0)
                  + losses.bce(run("D", x_rand), 0.0))
        return d_loss, {"d_loss": d_loss}
      return self._update(c, ("D",), loss_fn)

    def code_disc(i, c):
      z = self.sample_latent(jax.random.fold_in(k_cd, i), b)
      c, z_hat = self._forward(c, lambda run: run("E", x))

      def loss_fn(run):
        cd_loss = losses.bce(run("CD", z_hat), 0.0) + losses.bce(run("CD", z), 1.0)
        return cd_loss, {"cd_loss": cd_loss}
      return self._update(c, ("CD",), loss_fn)

    c = _repeat(self.n_gen, enc_gen, c)
    c = _repeat(self.n_critic, disc, c)
    return _repeat(self.n_critic, code_disc, c)

  # α-WGAN: Alpha_WGAN_ADNI_train.ipynb, training cell (g_iter = d_iter = cd_iter = 1).
  #   E+G: 10·L1(x̂, x) − CD(ẑ) − D(x̂) − D(G(z)); e step, g step twice.
  #        (Commit 63cabed adds c_loss = −CD(ẑ) to loss1, commit 4223902 drops it;
  #        kept here: without it nothing pulls the codes ẑ towards the prior.)
  #   D:   −2·D(x) + D(x̂) + D(G(z')) + 10·GP(x, G(z')) + 10·GP(x, x̂), with E and
  #        G updated and a *new* real batch in the reference (the same batch here);
  #   CD:  −CD(z'') + CD(ẑ) + 10·GP(ẑ, z''), ẑ from the critic update. The
  #        reference's CD(ẑ) term is `-c_loss`, computed during the E+G update while
  #        CD was frozen (requires_grad False), so it carried no gradient to CD.
  # Penalty norms are per sample ('eps_norm' over the flattened gradient).
  def _alpha_wgan(self, c: _Carry, x: Array, key: jax.Array) -> _Carry:
    b = x.shape[0]
    k_g, k_d, k_cd = (jax.random.fold_in(key, i) for i in range(3))

    def enc_gen(i, c):
      z = self.sample_latent(jax.random.fold_in(k_g, i), b)

      def loss_fn(run):
        z_hat = run("E", x)
        x_hat, x_rand = run("G", z_hat), run("G", z)
        recon = losses.l1(x_hat, x)
        code = -_mean(run("CD", z_hat))
        adv = -_mean(run("D", x_hat)) - _mean(run("D", x_rand))
        total = self.recon_weight * recon + code + adv
        return total, {"loss": total, "recon": recon, "g_adv": adv, "e_code": code}
      return self._update(c, ("E", "G"), loss_fn)

    def critic(i, c):
      kz, k_r, k_h = jax.random.split(jax.random.fold_in(k_d, i), 3)
      z = self.sample_latent(kz, b)
      c, (x_hat, x_rand) = self._forward(c, lambda run: (run("G", run("E", x)), run("G", z)))

      def loss_fn(run):
        w = -2.0 * _mean(run("D", x)) + _mean(run("D", x_hat)) + _mean(run("D", x_rand))
        d = run.frozen("D")
        gp = (losses.gradient_penalty(d, x, x_rand, k_r)
              + losses.gradient_penalty(d, x, x_hat, k_h))
        d_loss = w + self.gp_weight * gp
        return d_loss, {"d_loss": d_loss, "gp": gp}
      return self._update(c, ("D",), loss_fn)

    def code_critic(i, c):
      kz, kgp = jax.random.split(jax.random.fold_in(k_cd, i))
      z = self.sample_latent(kz, b)
      # ẑ as the critic update computed it (E unchanged since): no extra stats update.
      c, z_hat = self._forward(c, lambda run: run.frozen("E")(x))

      def loss_fn(run):
        cd_z = _mean(run("CD", z))
        cd_zhat = _mean(run("CD", z_hat))
        if not self.code_critic_grad_from_zhat:
          cd_zhat = jax.lax.stop_gradient(cd_zhat)  # the reference: a constant for CD
        gp = losses.code_gradient_penalty(run.frozen("CD"), z_hat, z, kgp)
        cd_loss = -cd_z + cd_zhat + self.gp_weight * gp
        return cd_loss, {"cd_loss": cd_loss, "cd_gp": gp}
      return self._update(c, ("CD",), loss_fn)

    c = _repeat(self.n_gen, enc_gen, c)
    c = _repeat(self.n_critic, critic, c)
    return _repeat(self.n_critic, code_critic, c)

  # 3D VAE (paper §3.1; no public reference): the slice VAE's objective on whole
  # volumes, mean_b [Σ_voxels (x̂ − x)² + β Σ_latent KL] (`slicevae.losses.vae_loss`).
  def _vae3d(self, c: _Carry, x: Array, key: jax.Array) -> _Carry:
    def loss_fn(run):
      x_hat, mu, logvar = run("VAE", x, key)
      return vae_losses.vae_loss(x_hat.astype(jnp.float32), x, mu.astype(jnp.float32),
                             logvar.astype(jnp.float32), self.kl_weight)
    return self._update(c, ("VAE",), loss_fn)
