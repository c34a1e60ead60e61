"""Config loading: strict keys, types, overrides, and errors that name the key and the file."""

import pytest

from facescale.cli import main as cli_main
from facescale.config import ConfigError, FaceScaleConfig, dump_config, load_config


def write(tmp_path, text, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path):
    p = write(tmp_path, "train:\n  lr: 0.05\nmodel:\n  backbone: mobilefacenet\n")
    cfg = load_config(p, ["train.lr=0.2", "scaling.num_workers=4", "data.val_bins=[a.bin, b.bin]"])
    assert cfg.train.lr == 0.2
    assert cfg.scaling.num_workers == 4
    assert cfg.model.backbone == "mobilefacenet"
    assert cfg.data.val_bins == ["a.bin", "b.bin"]
    # the resolved config round-trips through its YAML dump
    again = load_config(write(tmp_path, dump_config(cfg), "dump.yaml"))
    assert again == cfg


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert "train.lrr" in str(exc.value) and str(p) in str(exc.value) and "unknown key" in str(exc.value)


def test_wrong_type_names_key(tmp_path):
    p = write(tmp_path, "train:\n  batch_size: lots\n")
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_config(p)


def test_unknown_override_key(tmp_path):
    p = write(tmp_path, "{}\n")
    with pytest.raises(ConfigError, match=r"scaling\.num_wrkers: unknown key"):
        load_config(p, ["scaling.num_wrkers=3"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(p, ["train.lr"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = write(tmp_path, "train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(write(tmp_path, "- a\n- b\n", "list.yaml"))


def test_margin_section_is_strict(tmp_path):
    p = write(tmp_path, "classifier:\n  margin:\n    type: arcfaec\n")
    with pytest.raises(ConfigError, match=r"classifier\.margin\.type"):
        load_config(p)


def test_cli_reports_config_error_before_ray(tmp_path, capsys):
    p = write(tmp_path, "train:\n  lrr: 0.1\n")
    assert cli_main(["train", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "train.lrr" in err and str(p) in err


def test_repo_configs_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files, "configs/ should hold at least the demo config"
    for f in files:
        assert isinstance(load_config(f), FaceScaleConfig)


def test_classifier_combinations_checked_before_ray(tmp_path):
    p = write(tmp_path, "classifier:\n  margin:\n    type: magface\n")
    with pytest.raises(ConfigError, match="needs classifier.type: partial_fc"):
        load_config(p)
    assert load_config(p, ["classifier.type=partial_fc"]).classifier.margin.type == "magface"
    with pytest.raises(ConfigError, match="train.momentum must be > 0"):
        load_config(None, ["classifier.type=partial_fc", "train.momentum=0"])


def test_plan_command_prints_per_rank_memory(capsys):
    code = cli_main(["plan", "--identities", "10M", "--world-size", "64", "--batch-size", "128",
                     "--sample-rate", "0.1", "--embedding", "512"])
    out = capsys.readouterr().out
    assert code == 0
    assert "156,250" in out or "156250" in out, out  # 10M classes / 64 ranks
    assert cli_main(["plan", "--identities", "10M", "--world-size", "2", "--batch-size", "128",
                     "--memory-gib", "1"]) == 1
