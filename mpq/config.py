"""The base config every file in `configs/` starts from, and its validation.

Fields (override any on the command line as `--config.FIELD=VALUE`):
  dataset               'fashion_mnist' (local IDX files) or 'tfds:NAME' (prepared TFDS dataset)
  data_dir              where the dataset lives ('' = the default places)
  num_train_examples    keep only the first N training examples (0 = all)
  num_test_examples     keep only the first N test examples (0 = all)
  augment               'none', 'flip', 'crop' or 'crop_flip' (random crop with 4-pixel padding,
                        horizontal flip)
  model, model_kwargs   a name from `mpq.models.MODELS` and its keyword arguments
  batch_size            global batch (split over devices and processes)
  eval_batch_size       global batch for evaluation
  num_epochs            training length in epochs (may be fractional) ...
  num_train_steps       ... or in steps, when > 0 (wins over num_epochs)
  optimizer             'sgd' (with `momentum`, Nesterov), 'adam' or 'adamw'
  learning_rate         peak learning rate
  schedule              'cosine' (to 0) or 'constant', after `warmup_steps` of linear warm-up
  weight_decay          decoupled (adamw) or L2 added to the gradient (sgd, adam); kernels only
  grad_clip_norm        clip the global gradient norm (0 = off)
  label_smoothing       for the cross-entropy loss
  seed                  model init, data order and augmentation
  log_every             steps between metric lines / TensorBoard points
  eval_every            steps between evaluations on the test split (0 = once per epoch)
  checkpoint_every      steps between checkpoints (0 = once per epoch); the last step is always saved
  keep_checkpoints      how many recent checkpoints to keep (the best is kept separately)
  init_from             a workdir whose latest checkpoint initialises the model (e.g. a float model)
  quant                 quantization-aware training (off: `quant.enabled=False`):
    enabled             train with fake-quantized weights and activations
    w_bits, a_bits      default bitwidths (2..16) of every dense/conv weight and layer input
    estimator           default gradient estimator: none, ste, lsq, lsq+, tqt, noise, dbits
    rules               ordered (regex, dict(w_bits=, a_bits=, estimator=)) pairs over layer paths,
                        first full match wins (see `mpq.quant.rules`)
    calib_act           activation calibration before training: max, percentile, mse, entropy
    calib_weight        weight calibration (per channel): max, mse
    calib_percentile    for calib_act=percentile
    calib_batches       training batches used for calibration
    bn_freeze_step      training steps after which folded BatchNorm uses its EMA statistics (-1: never)
    ema_decay           EMA decay of the activation ranges of the `ste` estimator
    noise_lambda0, noise_tau   `noise` estimator: amplitude lambda0 * exp(-step / tau)
    noise_rng           `noise` estimator's U(-1, 1) generator: 'hash' (a counter hash, the cheap
                        default) or 'threefry' (jax.random; see mpq.quant.estimators.noise_uniform)
    osc_dampen          oscillation dampening (Nagel et al. 2022): final loss weight (0: off), annealed
                        from 0 with a half cosine
    osc_freeze          iterative weight freezing: oscillation-frequency threshold (0: off); with
                        folded BatchNorm it needs bn_freeze_step >= 0 (an error says so)
    osc_track           log per-layer oscillation frequencies (`osc/...`) without freezing
    osc_momentum        EMA momentum of the oscillation frequency
    teacher_workdir     knowledge distillation from this run's latest checkpoint ('' = off)
    distill_weight      loss = (1 - w) CE + w T^2 KL(teacher || student) at temperature
    distill_temperature   T
  mixed                 mixed-precision allocation before QAT (needs quant.enabled and init_from):
    enabled, method     'ilp' (sensitivities + exact ILP under the budgets) or 'dbits' (learned
                        continuous bits under a Lagrangian size budget, then ILP rounding and
                        fine-tuning; needs quant.estimator='dbits' and weight_bits_avg)
    sensitivity         'hessian' (Hutchinson trace x quantization error) or 'measured' (loss increase)
    solver              'ilp' or 'greedy' (the baseline)
    bit_choices         candidate bitwidths; a_bits = 0 ties activation bits to them, > 0 fixes them
    weight_bits_avg     budget: average weight bits over the allocated layers (model size)
    bops_ratio          budget: BOPs as a fraction of W8A8
    activation_bits_max   no layer's activations above this (0 = no limit)
    latency_table, latency_budget   JSON {"layer": {"w4a4": ms, ...}} and the summed budget
    pins                (regex, bits) pairs, first match wins, e.g. (('conv1|head', 8),)
    calib_examples      training examples for the sensitivities
    hutchinson_tol, hutchinson_max_probes   Hutchinson stopping rule (relative standard error)
    dbits_fraction      dbits: fraction of training with learned bits before rounding
    dbits_lr            dbits: Adam learning rate of the continuous bits
    lagrange_lr         dbits: dual-ascent step of the budget's Lagrange multiplier
"""

from __future__ import annotations

import ml_collections

from mpq.errors import UserError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "constant")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.dataset = "fashion_mnist"
  c.data_dir = ""
  c.num_train_examples = 0
  c.num_test_examples = 0
  c.augment = "none"

  c.model = "cnn"
  c.model_kwargs = ml_collections.ConfigDict()

  c.batch_size = 128
  c.eval_batch_size = 500
  c.num_epochs = 10.0
  c.num_train_steps = -1
  c.optimizer = "adamw"
  c.momentum = 0.9
  c.learning_rate = 1e-3
  c.schedule = "cosine"
  c.warmup_steps = 0
  c.weight_decay = 1e-4
  c.grad_clip_norm = 0.0
  c.label_smoothing = 0.0
  c.seed = 0

  c.log_every = 50
  c.eval_every = 0
  c.checkpoint_every = 0
  c.keep_checkpoints = 3
  c.init_from = ""

  c.quant = ml_collections.ConfigDict()
  c.quant.enabled = False
  c.quant.w_bits = 8
  c.quant.a_bits = 8
  c.quant.estimator = "lsq"
  c.quant.rules = ()
  c.quant.calib_act = "percentile"
  c.quant.calib_weight = "mse"
  c.quant.calib_percentile = 99.99
  c.quant.calib_batches = 4
  c.quant.bn_freeze_step = -1
  c.quant.ema_decay = 0.99
  c.quant.noise_lambda0 = 0.5
  c.quant.noise_tau = 1000.0
  c.quant.noise_rng = "hash"
  c.quant.osc_dampen = 0.0
  c.quant.osc_freeze = 0.0
  c.quant.osc_track = False
  c.quant.osc_momentum = 0.01
  c.quant.teacher_workdir = ""
  c.quant.distill_weight = 0.5
  c.quant.distill_temperature = 1.0

  c.mixed = ml_collections.ConfigDict()
  c.mixed.enabled = False
  c.mixed.method = "ilp"
  c.mixed.sensitivity = "hessian"
  c.mixed.solver = "ilp"
  c.mixed.bit_choices = (2, 3, 4, 5, 6, 8)
  c.mixed.a_bits = 0
  c.mixed.weight_bits_avg = 0.0
  c.mixed.bops_ratio = 0.0
  c.mixed.activation_bits_max = 0
  c.mixed.latency_table = ""
  c.mixed.latency_budget = 0.0
  c.mixed.pins = ()
  c.mixed.calib_examples = 256
  c.mixed.hutchinson_tol = 0.05
  c.mixed.hutchinson_max_probes = 32
  c.mixed.dbits_fraction = 0.5
  c.mixed.dbits_lr = 0.01
  c.mixed.lagrange_lr = 0.05
  return c


def from_dict(stored: dict) -> ml_collections.ConfigDict:
  """A config saved by an earlier run (checkpoint metadata) over today's defaults, so that fields
  added since then take their default values."""
  config = base_config()

  def merge(dst, src):
    for k, v in src.items():
      if isinstance(v, dict) and k in dst and isinstance(dst[k], ml_collections.ConfigDict):
        merge(dst[k], v)
      else:
        with dst.ignore_type():
          dst[k] = v

  merge(config, stored)
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises UserError for values that are of the right type but out of range."""
  from mpq.data import AUGMENTATIONS  # pylint: disable=g-import-not-at-top
  from mpq.models import MODELS  # pylint: disable=g-import-not-at-top

  def check(ok, msg):
    if not ok:
      raise UserError(msg)

  check(config.model in MODELS, f"config.model={config.model!r} is unknown; use one of {sorted(MODELS)}")
  check(config.optimizer in OPTIMIZERS,
        f"config.optimizer={config.optimizer!r} is unknown; use one of {OPTIMIZERS}")
  check(config.schedule in SCHEDULES,
        f"config.schedule={config.schedule!r} is unknown; use one of {SCHEDULES}")
  check(config.augment in AUGMENTATIONS,
        f"config.augment={config.augment!r} is unknown; use one of {AUGMENTATIONS}")
  check(config.batch_size > 0, f"config.batch_size={config.batch_size} must be positive")
  check(config.eval_batch_size > 0, f"config.eval_batch_size={config.eval_batch_size} must be positive")
  check(config.num_train_steps > 0 or config.num_epochs > 0,
        "set config.num_epochs > 0 or config.num_train_steps > 0")
  check(config.learning_rate > 0, f"config.learning_rate={config.learning_rate} must be positive")
  check(config.weight_decay >= 0, f"config.weight_decay={config.weight_decay} must be >= 0")
  check(config.log_every > 0, f"config.log_every={config.log_every} must be positive")
  for key in ("eval_every", "checkpoint_every", "warmup_steps", "num_train_examples",
              "num_test_examples"):
    check(config[key] >= 0, f"config.{key}={config[key]} must be >= 0")
  check(config.keep_checkpoints >= 1, f"config.keep_checkpoints={config.keep_checkpoints} must be >= 1")
  qc = config.quant
  from mpq.quant import calibration as calib  # pylint: disable=g-import-not-at-top
  from mpq.quant.estimators import NOISE_RNGS  # pylint: disable=g-import-not-at-top
  from mpq.quant import rules  # pylint: disable=g-import-not-at-top
  rules.check_values("config.quant", {"w_bits": qc.w_bits, "a_bits": qc.a_bits,
                                      "estimator": qc.estimator})
  check(qc.calib_act in calib.ACT_METHODS,
        f"config.quant.calib_act={qc.calib_act!r} is unknown; use one of {calib.ACT_METHODS}")
  check(qc.calib_weight in calib.WEIGHT_METHODS,
        f"config.quant.calib_weight={qc.calib_weight!r} is unknown; use one of {calib.WEIGHT_METHODS}")
  check(0 < qc.calib_percentile <= 100,
        f"config.quant.calib_percentile={qc.calib_percentile} must be in (0, 100]")
  check(qc.calib_batches >= 1, f"config.quant.calib_batches={qc.calib_batches} must be >= 1")
  check(qc.noise_tau > 0, f"config.quant.noise_tau={qc.noise_tau} must be positive")
  check(qc.noise_rng in NOISE_RNGS, f"config.quant.noise_rng={qc.noise_rng!r} is unknown; use "
        + " or ".join(repr(r) for r in NOISE_RNGS))
  check(qc.osc_dampen >= 0, f"config.quant.osc_dampen={qc.osc_dampen} must be >= 0")
  check(0 <= qc.osc_freeze < 1, f"config.quant.osc_freeze={qc.osc_freeze} must be in [0, 1)")
  check(0 < qc.osc_momentum <= 1, f"config.quant.osc_momentum={qc.osc_momentum} must be in (0, 1]")
  check(0 <= qc.distill_weight <= 1, f"config.quant.distill_weight={qc.distill_weight} must be in [0, 1]")
  mc = config.mixed
  if mc.enabled:
    check(qc.enabled, "mixed.enabled=True needs quant.enabled=True")
    check(mc.method in ("ilp", "dbits"), f"config.mixed.method={mc.method!r}: use 'ilp' or 'dbits'")
    if mc.method == "dbits":
      check(qc.estimator == "dbits", "mixed.method=dbits needs --config.quant.estimator=dbits")
      check(mc.weight_bits_avg > 0, "mixed.method=dbits needs a size budget: mixed.weight_bits_avg")
      check(0 < mc.dbits_fraction < 1, f"mixed.dbits_fraction={mc.dbits_fraction} must be in (0, 1)")
    check(mc.sensitivity in ("hessian", "measured"),
          f"config.mixed.sensitivity={mc.sensitivity!r} is unknown; use 'hessian' or 'measured'")
    check(mc.solver in ("ilp", "greedy"), f"config.mixed.solver={mc.solver!r}: use 'ilp' or 'greedy'")
    check(len(mc.bit_choices) > 0 and all(2 <= int(b) <= 16 for b in mc.bit_choices),
          f"config.mixed.bit_choices={tuple(mc.bit_choices)} must be bitwidths from 2 to 16")
    check(mc.weight_bits_avg >= 0 and mc.bops_ratio >= 0 and mc.activation_bits_max >= 0,
          "mixed budgets must be >= 0 (0 = not constrained)")
    check(bool(mc.latency_table) == (mc.latency_budget > 0),
          "set both mixed.latency_table and mixed.latency_budget, or neither")
    for i, pin in enumerate(mc.pins):
      check(isinstance(pin, (tuple, list)) and len(pin) == 2 and isinstance(pin[0], str),
            f"mixed.pins[{i}]={pin!r} must be a pair (regex, bits)")
  check(qc.distill_temperature > 0,
        f"config.quant.distill_temperature={qc.distill_temperature} must be positive")
