from pathlib import Path

import pytest

from perp.config import PerpConfig, load_params, parse_pattern, parse_recover_methods
from perp.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_repo_params_and_defaults_are_valid():
    config = load_params(REPO / "params.yaml")
    assert config.prune.method == "wanda"
    assert PerpConfig().model.name == "smollm2-135m"


@pytest.mark.parametrize(
    "override, message",
    [
        ("prune.sparsity=1.5", "prune.sparsity: must be in [0, 1), got 1.5"),
        ("prune.sparsity=-0.1", "prune.sparsity: must be in [0, 1)"),
        ("prune.pattern=4:2", "prune.pattern: '4:2' is not a valid N:M pattern"),
        ("prune.pattern=2:2", "prune.pattern: '2:2' is not a valid N:M pattern"),
        ("prune.pattern=2-4", "prune.pattern: '2-4' is not a pattern"),
        ("prune.method=obs", "prune.method: unknown method 'obs' (allowed: magnitude, wanda, sparsegpt)"),
        ("recover.method=norm+dora", "recover.method: unknown method 'dora'"),
        ("recover.method=lora+masklora", "choose one LoRA form"),
        ("recover.rank=0", "recover.rank: LoRA rank must be > 0, got 0"),
        ("recover.lr=0", "recover.lr: must be a finite number > 0"),
        ("recover.lr=nan", "recover.lr: must be a finite number > 0, got nan"),
        ("recover.alpha=inf", "recover.alpha: must be a finite number > 0, got inf"),
        ("register.stages=[dev,latest]", "register.stages: 'latest' is not a valid stage name"),
        ("register.stages=[1st]", "register.stages: '1st' is not a valid stage name"),
        ("data.calibration.nsamples=0", "data.calibration.nsamples: must be > 0, got 0"),
        ("data.calibration.source=/no/such/file.jsonl", "data.calibration.source: '/no/such/file.jsonl' is not a file"),
        ("model.name=./no-such-model", "model.name: './no-such-model' does not exist"),
        ("model.name=/tmp/none.gguf", "model.name: '/tmp/none.gguf' does not exist"),
        ("model.dtype=int3", "model.dtype: got 'int3'"),
        ("prune.nonsense=1", "prune.nonsense: unknown key"),
        ("register.store=ftp://host/x", "register.store: unknown store scheme 'ftp://'"),
        ("register.name=../etc", "register.name: '../etc' is not a valid model name"),
        ("evaluate.zeroshot.task_data=/no/such/dir", "evaluate.zeroshot.task_data: '/no/such/dir' is not a directory"),
        ("prune.compute_dtype=int8",
         "prune.compute_dtype: unknown dtype 'int8' (allowed: auto, fast, float32, bfloat16"),
        ("prune.batch_size=0", "prune.batch_size: must be > 0 or null (automatic), got 0"),
        ("prune.batch_size=lots", "prune.batch_size: "),
        ("prune.error_tokens=-1", "prune.error_tokens: must be >= 0"),
        ("prune.sequential=diagonal", "prune.sequential: unknown mode 'diagonal' (allowed: layer, linear, auto)"),
        ("prune.percdamp=0", "prune.percdamp: must be in (0, 1), got 0"),
        ("prune.owl_m=nan", "prune.owl_m: must be a finite number > 0, got nan"),
        ("recover.weight_decay=nan", "recover.weight_decay: must be a finite number >= 0, got nan"),
        ("recover.warmup_fraction=1", "recover.warmup_fraction: must be in [0, 1), got 1"),
        ("evaluate.batch_size=0", "evaluate.batch_size: must be > 0, got 0"),
        ("evaluate.zeroshot.limit=0", "evaluate.zeroshot.limit: must be > 0, got 0"),
        ("evaluate.perplexity=[{name: w, source: 'embedded:wiki-eval', max_windows: 0}]",
         "evaluate.perplexity.0.max_windows: must be > 0 or null, got 0"),
        ("register.gates.prod.max_ppl_ratio=-1", "register.gates.prod.max_ppl_ratio: must be a finite number > 0"),
        ("register.gates.prod.max_zeroshot_drop=.nan",
         "register.gates.prod.max_zeroshot_drop: must be a finite number"),
        ("register.gates.prod.min_sparsity=1.5", "register.gates.prod.min_sparsity: must be in [0, 1), got 1.5"),
        ("recover.steps=true", "recover.steps: must be a number, got true"),
        ("register.gates.prod.max_ppl_ratio=true", "register.gates.prod.max_ppl_ratio: must be a number, got true"),
        ("prune.sparsity=false", "prune.sparsity: must be a number, got false"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as excinfo:
        load_params(overrides=[override])
    text = str(excinfo.value)
    assert message in text
    assert "\n" not in text


def test_prune_engine_settings_default_to_the_engine_defaults_and_load_from_yaml(tmp_path, monkeypatch):
    import torch

    from perp.config import PRUNE_COMPUTE_DTYPES, PRUNE_SEQUENTIAL_MODES
    from perp.prune.engine import SEQUENTIAL_MODES, EngineOptions
    from perp.prune.run import resolve_compute_dtype

    prune = PerpConfig().prune
    engine = EngineOptions()
    assert (prune.compute_dtype, prune.batch_size) == ("auto", None)
    assert (prune.error_tokens, prune.sequential) == (engine.error_tokens, engine.sequential)
    assert PRUNE_SEQUENTIAL_MODES == SEQUENTIAL_MODES
    assert all(resolve_compute_dtype(name) in (None, torch.float32, torch.bfloat16, torch.float16)
               for name in PRUNE_COMPUTE_DTYPES)
    import perp.prune.run as run

    monkeypatch.setattr(run, "native_bf16", lambda device: device.type == "cuda")  # a CPU without native bf16
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_compute_dtype("fast", cuda, torch.float32) == torch.bfloat16  # native: bf16 under autocast
    assert resolve_compute_dtype("fast", cuda, torch.bfloat16) is None  # already half: the weights' dtype
    assert resolve_compute_dtype("fast", cpu, torch.float32) is None  # emulated bf16: stay fp32
    quick = load_params(REPO / "params.yaml").prune  # the CPU quick profile: bf16, one pass per layer
    assert quick == prune.model_copy(update={"compute_dtype": "fast", "sequential": "auto"})

    params = tmp_path / "params.yaml"
    params.write_text("prune:\n  compute_dtype: bfloat16\n  batch_size: 3\n  error_tokens: 0\n  sequential: linear\n")
    loaded = load_params(params).prune
    assert (loaded.compute_dtype, loaded.batch_size, loaded.error_tokens, loaded.sequential) == \
        ("bfloat16", 3, 0, "linear")


def test_unquoted_nm_pattern_in_yaml_stays_a_pattern(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("prune:\n  pattern: 2:4\n  method: sparsegpt\n")
    config = load_params(params)
    assert config.prune.pattern == "2:4"
    assert config.prune.nm == (2, 4)
    assert config.prune.target_sparsity == 0.5
    # Untouched sections keep their defaults.
    assert config.data.calibration.nsamples == 32


def test_overrides_go_deep_and_parse_yaml_scalars():
    config = load_params(overrides=["data.calibration.seqlen=128", "prune.include=[mlp.*]", "recover.method=norm+bias"])
    assert config.data.calibration.seqlen == 128
    assert config.prune.include == ["mlp.*"]
    assert config.recover.methods == ["norm", "bias"]


def test_params_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prune: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_params(overrides=["prune.sparsity"])


def test_pattern_and_method_parsers():
    assert parse_pattern("unstructured") is None
    assert parse_pattern("4:8") == (4, 8)
    with pytest.raises(ValueError):
        parse_pattern("0:4")
    assert parse_recover_methods("norm+bias+masklora") == ["norm", "bias", "masklora"]
    with pytest.raises(ValueError, match="cannot be combined"):
        parse_recover_methods("full+norm")


def test_paper_profile_is_valid():
    config = load_params(REPO / "params.paper.yaml")
    assert config.data.calibration.nsamples == 128 and config.data.calibration.seqlen == 2048
    assert len(config.evaluate.zeroshot.tasks) == 7
    assert config.prune.compute_dtype == "bfloat16" and config.prune.sequential == "layer"


def test_relative_store_in_a_temporary_dvc_experiment_is_refused(tmp_path, monkeypatch):
    from perp.config import ConfigError, load_params

    workspace = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpk3j2"
    workspace.mkdir(parents=True)
    monkeypatch.chdir(workspace)
    with pytest.raises(ConfigError, match=r"register\.store: '\./perp-store' is relative, and this runs in a "
                                          r"temporary DVC experiment workspace"):
        load_params(None, ["register.store=./perp-store"])
    assert load_params(None, [f"register.store={tmp_path / 'store'}"]).register.store == str(tmp_path / "store")
    monkeypatch.chdir(tmp_path / "repo")  # the workspace itself (dvc repro, dvc exp run): relative is fine
    assert load_params(None, ["register.store=./perp-store"]).register.store == "./perp-store"
