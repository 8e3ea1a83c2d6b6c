"""Submissions: exact competition formats, every validation failure, clipping, gzip, and the kaggle tool path."""
import gzip
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from featstack.errors import FeatstackError
from featstack.submission import build, submit, validate

from conftest import ROOT


def make_run(folder, ids, classes, layout, sample=None, seed=0, weights="imagenet"):
    """A run folder as stack.py leaves it, with Dirichlet test probabilities, and its dataset's split.csv."""
    folder.mkdir(parents=True)
    proba = np.random.default_rng(seed).dirichlet(np.ones(len(classes)), len(ids))
    frame = pd.DataFrame(proba, columns=classes)
    frame.insert(0, "id", ids)
    frame.sample(frac=1, random_state=seed).to_csv(folder / "test_predictions.csv", index=False)  # any row order
    features = folder.parent / "features" / folder.name
    features.mkdir(parents=True)
    pd.DataFrame({"id": ["trainimg"] + list(ids), "split": ["train"] + ["test"] * len(ids),
                  "label": [classes[0]] + [""] * len(ids)}).to_csv(features / "split.csv", index=False)
    meta = {"layout": layout, "sample_submission": str(sample) if sample else None}
    (folder / "config.json").write_text(json.dumps({
        "dataset_meta": meta, "classes": classes, "created": "2026", "features_dir": str(features),
        "feature_files": {"resnet50": {"weights": weights}}}))
    (folder / "report.json").write_text(json.dumps({"cv": {"log_loss": 0.5}, "holdout": {"log_loss": 0.4}}))
    return folder


@pytest.fixture
def real_breeds(shared_data):
    d = shared_data / "dog-breed-identification"
    breeds = sorted(pd.read_csv(d / "labels.csv").breed.unique())
    test_ids = (d / "test_ids.txt").read_text().split()
    return breeds, test_ids


@pytest.mark.slow
def test_dog_breed_format_from_real_breed_list(tmp_path, real_breeds):
    breeds, test_ids = real_breeds
    assert len(breeds) == 120 and len(test_ids) == 10357
    sample = tmp_path / "sample_submission.csv"
    pd.DataFrame(1 / 120, index=pd.Index(test_ids, name="id"), columns=breeds).reset_index().to_csv(sample, index=False)
    run = make_run(tmp_path / "run", test_ids, list(np.random.default_rng(1).permutation(breeds)), "dog-breed", sample)
    frame, fmt = build(run)
    assert fmt == "dog-breed"
    assert list(frame.columns) == list(pd.read_csv(sample, nrows=0).columns) == ["id"] + breeds
    assert list(frame.id) == test_ids
    pred = pd.read_csv(run / "test_predictions.csv").set_index("id")
    np.testing.assert_allclose(frame.set_index("id").loc[test_ids[7], "beagle"], pred.loc[test_ids[7], "beagle"])
    no_sample, _ = build(make_run(tmp_path / "run2", test_ids, breeds[::-1], "dog-breed"))
    assert list(no_sample.columns) == ["id"] + breeds  # alphabetical without a sample file


def test_cats_dogs_format(tmp_path):
    ids = [str(i) for i in range(1, 13)]
    run = make_run(tmp_path / "run", ids[::-1], ["cat", "dog"], "cats-dogs")
    frame, fmt = build(run)
    pred = pd.read_csv(run / "test_predictions.csv", dtype={"id": str}).set_index("id")
    assert fmt == "cats-dogs" and list(frame.columns) == ["id", "label"]
    assert list(frame.id) == ids  # numeric order: 1, 2, ... 10, not 1, 10, 11
    np.testing.assert_allclose(frame.label, pred.loc[ids, "dog"])
    clipped, _ = build(run, clip=0.005)
    assert clipped.label.min() >= 0.005 and clipped.label.max() <= 0.995


def test_clip_then_renormalise(tmp_path):
    run = make_run(tmp_path / "run", ["a", "b"], ["x", "y", "z"], "folders")
    pd.DataFrame({"id": ["a", "b"], "x": [1.0, 0.2], "y": [0.0, 0.3], "z": [0.0, 0.5]}).to_csv(
        run / "test_predictions.csv", index=False)
    frame, fmt = build(run, clip=0.01)
    assert fmt == "generic"
    row = frame.set_index("id").loc["a"].to_numpy()
    np.testing.assert_allclose(row, np.array([0.99, 0.01, 0.01]) / 1.01)
    np.testing.assert_allclose(frame.iloc[:, 1:].sum(axis=1), 1, atol=1e-12)
    labels, _ = build(run, labels=True)
    assert labels.set_index("id").label.to_dict() == {"a": "x", "b": "z"}


GOOD = pd.DataFrame({"id": ["a", "b"], "x": [0.25, 0.5], "y": [0.75, 0.5]})


@pytest.mark.parametrize("frame, match", [
    (GOOD[["id", "y", "x"]], "same names, other order"),
    (GOOD[["id", "x"]], "missing y"),
    (GOOD.assign(w=0.0), "unexpected w"),
    (pd.concat([GOOD, GOOD.iloc[:1]]), "duplicate ids: a"),
    (GOOD.iloc[:1], "lacks 1 expected ids: b"),
    (pd.concat([GOOD, GOOD.iloc[:1].assign(id="c")]), "ids the competition does not expect: c"),
    (GOOD.assign(x=[np.nan, 0.5]), "id 'a' column 'x' is nan"),
    (GOOD.assign(x=[1.25, 0.5]), "id 'a' column 'x' is 1.25"),
    (GOOD.assign(x=[0.2, 0.5]), r"rows must sum to 1 ± 1e-06: ids a"),
])
def test_validation_failures(frame, match):
    validate(GOOD, ["a", "b"], ["id", "x", "y"], "multiclass")
    with pytest.raises(FeatstackError, match=match):
        validate(frame, ["a", "b"], ["id", "x", "y"], "multiclass")


def test_invalid_run_writes_nothing(tmp_path):
    run = make_run(tmp_path / "run", ["a", "b"], ["x", "y"], "folders")
    pd.DataFrame({"id": ["a", "b"], "x": [0.5, np.nan], "y": [0.5, 0.5]}).to_csv(run / "test_predictions.csv",
                                                                                  index=False)
    with pytest.raises(FeatstackError, match=r"test_predictions\.csv: line 3 \(id 'b'\): column 'x' is empty, not a "
                                             r"probability in \[0, 1\]"):
        submit(run, submissions_dir=tmp_path / "subs")
    assert not (tmp_path / "subs").exists() or not list((tmp_path / "subs").iterdir())


def test_gzip_and_log(tmp_path):
    run = make_run(tmp_path / "run", [str(i) for i in range(5)], ["cat", "dog"], "cats-dogs")
    out = submit(run, out=tmp_path / "subs" / "x.csv.gz", submissions_dir=tmp_path / "subs")
    with gzip.open(out, "rt") as f:
        back = pd.read_csv(f, dtype={"id": str})
    pd.testing.assert_frame_equal(back, build(run)[0], check_exact=False)
    log = pd.read_csv(tmp_path / "subs" / "log.csv")
    assert log.iloc[-1].status == "written" and log.iloc[-1].cv_log_loss == 0.5 and log.iloc[-1].holdout_log_loss == 0.4


@pytest.fixture
def fake_kaggle(tmp_path, monkeypatch):
    """A stand-in `kaggle` first on PATH that records its arguments and environment, and fails when told to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "kaggle_calls.jsonl"
    script = bin_dir / "kaggle"
    script.write_text(f"""#!{sys.executable}
import json, os, sys
with open({str(record)!r}, "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], \
"env": {{k: v for k, v in os.environ.items() if k.startswith("KAGGLE")}}}}) + "\\n")
mode = os.environ.get("FAKE_KAGGLE_MODE", "ok")
if mode == "403":
    print("403 - Forbidden - You must accept this competition's rules before you'll be able to submit.")
    sys.exit(1)
if mode == "offline":
    print("Warning: Looks like you're using an outdated API Version")
    print("ConnectionError: HTTPSConnectionPool(host='www.kaggle.com', port=443): Max retries exceeded "
          "(Caused by NameResolutionError: Failed to resolve 'www.kaggle.com')")
    sys.exit(1)
print("Successfully submitted to Dog Breed Identification")
""")
    script.chmod(0o755)
    home = tmp_path / "home"
    (home / ".kaggle").mkdir(parents=True)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("HOME", str(home))
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR", "KAGGLE_API_TOKEN", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(var, raising=False)
    return {"record": record, "home": home}


def _calls(record):
    return [json.loads(l) for l in record.read_text().splitlines()] if record.exists() else []


def test_submit_calls_kaggle_with_exact_arguments(tmp_path, fake_kaggle, monkeypatch, capsys):
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "s3cr3tkey")
    run = make_run(tmp_path / "run", ["1", "2"], ["cat", "dog"], "cats-dogs")
    out = submit(run, competition="dogs-vs-cats-redux-kernels-edition", message="first try",
                 submissions_dir=tmp_path / "subs")
    calls = _calls(fake_kaggle["record"])
    assert calls[0]["argv"] == ["competitions", "submit", "dogs-vs-cats-redux-kernels-edition", "-f", str(out),
                                "-m", "first try"]
    assert calls[0]["env"]["KAGGLE_USERNAME"] == "someone"
    printed = capsys.readouterr()
    assert "s3cr3tkey" not in printed.out + printed.err
    assert printed.out.strip().splitlines()[-1] == str(out)
    log = pd.read_csv(tmp_path / "subs" / "log.csv")
    assert log.iloc[-1].status == "submitted" and log.iloc[-1].competition == "dogs-vs-cats-redux-kernels-edition"
    assert log.iloc[-1].message == "first try"


def test_missing_credentials_say_what_to_do(tmp_path, fake_kaggle):
    run = make_run(tmp_path / "run", ["1"], ["cat", "dog"], "cats-dogs")
    with pytest.raises(FeatstackError, match=r"no Kaggle credentials found: .*Create New Token.*\.kaggle/kaggle\.json"):
        submit(run, competition="c", submissions_dir=tmp_path / "subs")
    assert not _calls(fake_kaggle["record"])


def test_world_readable_kaggle_json_warns(tmp_path, fake_kaggle, capsys):
    cfg = fake_kaggle["home"] / ".kaggle" / "kaggle.json"
    cfg.write_text(json.dumps({"username": "u", "key": "k3y-value"}))
    cfg.chmod(0o644)
    run = make_run(tmp_path / "run", ["1"], ["cat", "dog"], "cats-dogs")
    submit(run, competition="c", message="m", submissions_dir=tmp_path / "subs")
    err = capsys.readouterr().err
    assert f"chmod 600 {cfg}" in err and "k3y-value" not in err
    cfg.chmod(stat.S_IRUSR | stat.S_IWUSR)
    submit(run, competition="c", message="m", submissions_dir=tmp_path / "subs")
    assert "chmod" not in capsys.readouterr().err


def test_failing_tool_shows_message_and_hint(tmp_path, fake_kaggle, monkeypatch):
    monkeypatch.setenv("KAGGLE_API_TOKEN", "tok")
    monkeypatch.setenv("FAKE_KAGGLE_MODE", "403")
    run = make_run(tmp_path / "run", ["1"], ["cat", "dog"], "cats-dogs")
    with pytest.raises(FeatstackError, match=r"403 - Forbidden.* — accept the competition's rules"):
        submit(run, competition="dog-breed-identification", message="m", submissions_dir=tmp_path / "subs")
    assert pd.read_csv(tmp_path / "subs" / "log.csv").iloc[-1].status == "submit failed"


def test_network_error_is_said_once(tmp_path, fake_kaggle, monkeypatch, capsys):
    monkeypatch.setenv("KAGGLE_API_TOKEN", "tok")
    monkeypatch.setenv("FAKE_KAGGLE_MODE", "offline")
    run = make_run(tmp_path / "run", ["1"], ["cat", "dog"], "cats-dogs")
    with pytest.raises(FeatstackError, match=r"submit failed: ConnectionError: .* — no connection to kaggle.com"
                       ) as err:
        submit(run, competition="dog-breed-identification", message="m", submissions_dir=tmp_path / "subs")
    shown = capsys.readouterr().err + str(err.value)
    assert shown.count("Max retries exceeded") == 1, shown  # not raw, then again wrapped
    assert "outdated API Version" in shown  # the tool's earlier lines are still shown


def _predictions(run, rows):
    pd.DataFrame(rows, columns=["id", "x", "y"]).to_csv(run / "test_predictions.csv", index=False)


@pytest.mark.parametrize("rows, kwargs, match", [
    ([("a", 1.0, 1.0), ("b", 0.5, 0.5)], {}, r"csv: line 2 \(id 'a'\): the probabilities sum to 2, not 1"),
    ([("a", 1.0, 1.0), ("b", 0.5, 0.5)], {"clip": 0.01}, r"line 2 \(id 'a'\): the probabilities sum to 2, not 1"),
    ([("a", 0.2, 1.8), ("b", 0.5, 0.5)], {}, r"line 2 \(id 'a'\): column 'y' is '1\.8', not a probability in \[0, 1\]"),
    ([("a", 0.2, 1.8), ("b", 0.5, 0.5)], {"clip": 0.01}, r"line 2 \(id 'a'\): column 'y' is '1\.8'"),
    ([("a", 0.5, 0.5), ("b", 0.5, 0.5), ("a", 0.5, 0.5)], {}, r"test_predictions\.csv: duplicate ids a"),
    ([("a", 0.5, 0.5)], {}, r"test_predictions\.csv: missing 1 test ids of .*split\.csv: b"),
    ([("a", 0.5, 0.5), ("b", 0.5, 0.5), ("c", 0.5, 0.5)], {}, r"1 ids are not test ids of .*split\.csv: c"),
])
def test_predictions_are_validated_as_read(tmp_path, rows, kwargs, match):
    run = make_run(tmp_path / "run", ["a", "b"], ["x", "y"], "folders")
    _predictions(run, rows)
    with pytest.raises(FeatstackError, match=match):
        submit(run, submissions_dir=tmp_path / "subs", **kwargs)
    assert not (tmp_path / "subs").exists()


def test_missing_id_is_reported_as_missing_against_the_sample(tmp_path):
    sample = tmp_path / "sample_submission.csv"
    pd.DataFrame({"id": ["a", "b", "c"], "x": 0.5, "y": 0.5}).to_csv(sample, index=False)
    run = make_run(tmp_path / "run", ["a", "b"], ["x", "y"], "dog-breed", sample=sample)
    with pytest.raises(FeatstackError, match=r"missing 1 test ids of .*sample_submission\.csv: c"):
        build(run)


def test_validation_errors_are_one_line_from_the_command(tmp_path):
    run = make_run(tmp_path / "run", ["a", "b"], ["x", "y"], "folders")
    _predictions(run, [("a", 0.5, 0.5), ("b", 0.5, 0.5), ("a", 0.5, 0.5)])
    proc = subprocess.run([sys.executable, str(ROOT / "submit.py"), "--run", str(run), "--submissions-dir",
                           str(tmp_path / "subs")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: "), proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "duplicate ids a" in proc.stderr


def test_random_weight_run_says_so_and_is_not_submitted_without_force(tmp_path, fake_kaggle, monkeypatch, capsys):
    monkeypatch.setenv("KAGGLE_API_TOKEN", "tok-123456")
    run = make_run(tmp_path / "run", ["1", "2"], ["cat", "dog"], "cats-dogs", weights="random")
    submit(run, submissions_dir=tmp_path / "subs")
    assert "RANDOM weights" in capsys.readouterr().out
    with pytest.raises(FeatstackError, match=r"RANDOM weights.*pass --force"):
        submit(run, competition="c", message="m", submissions_dir=tmp_path / "subs")
    assert not _calls(fake_kaggle["record"])
    submit(run, competition="c", message="m", submissions_dir=tmp_path / "subs", force=True)
    assert len(_calls(fake_kaggle["record"])) == 1
    capsys.readouterr()
    log = pd.read_csv(tmp_path / "subs" / "log.csv")
    assert list(log.weights) == ["random", "random"] and list(log.status) == ["written", "submitted"]
    trained = make_run(tmp_path / "run2", ["1", "2"], ["cat", "dog"], "cats-dogs")
    submit(trained, competition="c", message="m", submissions_dir=tmp_path / "subs")
    assert "RANDOM" not in capsys.readouterr().out
    assert pd.read_csv(tmp_path / "subs" / "log.csv").weights.iloc[-1] == "trained"


def test_old_log_gains_the_new_columns(tmp_path):
    subs = tmp_path / "subs"
    subs.mkdir()
    (subs / "log.csv").write_text("time,run_id,file,competition,message,status,cv_log_loss,holdout_log_loss\n"
                                  "2025-01-01T00:00:00,old,x.csv,,,written,0.5,0.4\n")
    submit(make_run(tmp_path / "run", ["1"], ["cat", "dog"], "cats-dogs"), submissions_dir=subs)
    log = pd.read_csv(subs / "log.csv", dtype=str, keep_default_na=False)
    assert list(log.run_id) == ["old", "run"] and list(log.weights) == ["", "trained"]


ECHO_AUTH = """
import base64
user, key = os.environ.get("KAGGLE_USERNAME", ""), os.environ.get("KAGGLE_KEY", "")
token = os.environ.get("KAGGLE_API_TOKEN", "")
cfg = os.path.join(os.environ["HOME"], ".kaggle", "kaggle.json")
if os.path.exists(cfg):
    creds = json.load(open(cfg)); user, key = creds["username"], creds["key"]
basic = base64.b64encode(f"{user}:{key}".encode()).decode()
print(f"send: Authorization: Basic {basic}", file=sys.stderr)
print(f"send: Authorization: Bearer {token}\\nuser={user} key={key}", file=sys.stderr)
print("401 - Unauthorized")
sys.exit(1)
"""


@pytest.mark.parametrize("how", ["env", "token", "kaggle.json"])
def test_credentials_echoed_by_the_tool_are_redacted(tmp_path, fake_kaggle, monkeypatch, capsys, how):
    script = next(p for p in (tmp_path / "bin").iterdir())
    script.write_text(script.read_text().replace('mode = os.environ.get("FAKE_KAGGLE_MODE", "ok")',
                                                 ECHO_AUTH + '\nmode = "ok"'))
    secrets = {"env": ["kaggle-user-x", "0123456789abcdef0123"], "token": ["KGAT_tok_9876543210"],
               "kaggle.json": ["json-user-y", "fedcba9876543210fedc"]}[how]
    if how == "env":
        monkeypatch.setenv("KAGGLE_USERNAME", secrets[0])
        monkeypatch.setenv("KAGGLE_KEY", secrets[1])
    elif how == "token":
        monkeypatch.setenv("KAGGLE_API_TOKEN", secrets[0])
    else:
        cfg = fake_kaggle["home"] / ".kaggle" / "kaggle.json"
        cfg.write_text(json.dumps({"username": secrets[0], "key": secrets[1]}))
        cfg.chmod(0o600)
    if len(secrets) == 2:
        import base64
        secrets.append(base64.b64encode(f"{secrets[0]}:{secrets[1]}".encode()).decode())
    run = make_run(tmp_path / "run", ["1"], ["cat", "dog"], "cats-dogs")
    with pytest.raises(FeatstackError, match=r"submit failed: .* — your API key is wrong") as err:
        submit(run, competition="c", message="m", submissions_dir=tmp_path / "subs")
    printed = capsys.readouterr()
    shown = printed.out + printed.err + str(err.value) + (tmp_path / "subs" / "log.csv").read_text()
    assert "Authorization: Basic ***" in printed.err or how == "token"
    assert not [s for s in secrets if s in shown], shown


def test_kaggle_beside_the_interpreter_comes_before_path(tmp_path, fake_kaggle, monkeypatch):
    monkeypatch.setenv("KAGGLE_API_TOKEN", "tok-123456")
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    mine = venv_bin / "kaggle"
    mine.write_text(next((tmp_path / "bin").iterdir()).read_text().replace('"argv": sys.argv[1:]',
                                                                          '"venv": True, "argv": sys.argv[1:]'))
    mine.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(venv_bin / "python"))  # a venv's python, not on PATH
    run = make_run(tmp_path / "run", ["1"], ["cat", "dog"], "cats-dogs")
    submit(run, competition="c", message="m", submissions_dir=tmp_path / "subs")
    assert _calls(fake_kaggle["record"])[-1].get("venv") is True
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))  # PATH without any kaggle: the venv's is still found
    submit(run, competition="c", message="m", submissions_dir=tmp_path / "subs")
    assert len(_calls(fake_kaggle["record"])) == 2


ECHO_DISGUISED = """
import base64
user, key = os.environ["KAGGLE_USERNAME"], os.environ["KAGGLE_KEY"]
basic = base64.b64encode(f"{user}:{key}".encode()).decode()
print("key in capitals:", key.upper())
print("key as base64:", base64.b64encode(key.encode()).decode())
print("key wrapped: " + key[:9] + "\\n" + key[9:])
print("send: Authorization: Basic " + basic[:17] + "\\n      " + basic[17:], file=sys.stderr)
print("401 - Unauthorized")
sys.exit(1)
"""


def test_credentials_in_capitals_base64_or_split_over_lines_are_redacted(tmp_path, fake_kaggle, monkeypatch, capsys):
    """#20 item 9: a tool that prints the key in upper case, base64-encoded alone, or wrapped over two lines."""
    import base64
    import re
    script = next(p for p in (tmp_path / "bin").iterdir())
    script.write_text(script.read_text().replace('mode = os.environ.get("FAKE_KAGGLE_MODE", "ok")',
                                                 ECHO_DISGUISED + '\nmode = "ok"'))
    user, key = "kaggle-user-x", "0123456789abcdef0123456789abcdef"
    monkeypatch.setenv("KAGGLE_USERNAME", user)
    monkeypatch.setenv("KAGGLE_KEY", key)
    run = make_run(tmp_path / "run", ["1"], ["cat", "dog"], "cats-dogs")
    with pytest.raises(FeatstackError, match=r"submit failed: .* — your API key is wrong") as err:
        submit(run, competition="c", message="m", submissions_dir=tmp_path / "subs")
    printed = capsys.readouterr()
    shown = printed.out + printed.err + str(err.value) + (tmp_path / "subs" / "log.csv").read_text()
    assert "key in capitals: ***" in shown and "key as base64: ***" in shown and "key wrapped: ***" in shown
    assert "Authorization: Basic ***" in shown, shown
    # However it is cut or cased, no form of the key is left: compared with every line break and space removed.
    squashed = re.sub(r"\s+", "", shown).lower()
    forms = [key, base64.b64encode(key.encode()).decode(), base64.b64encode(f"{user}:{key}".encode()).decode()]
    assert not [f for f in forms if f.lower() in squashed], shown
    assert not [f for f in forms for half in (f[:12], f[-12:]) if half.lower() in squashed], shown


@pytest.mark.parametrize("content, match", [
    (b"", r"test_predictions\.csv: the file is empty \(0 bytes\), not a predictions table"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", r"test_predictions\.csv: binary content \(a NUL byte at byte 8\)"),
    (b"id,x,y\na,0.5,0.5\nb,\xff\xfe,0.5\n", r"test_predictions\.csv: binary content \(not UTF-8 text at byte 19\)"),
    (b"id,x,y\n", r"test_predictions\.csv: a header without rows: run run has no test predictions"),
    (b"id,x,y\na,0.5,0.5\nb,inf,0\n", r"test_predictions\.csv: line 3 \(id 'b'\): column 'x' is 'inf', not a "
                                     r"probability in \[0, 1\]"),
    (b"id,x,y\na,-0.5,1.5\nb,0.5,0.5\n", r"line 2 \(id 'a'\): column 'x' is '-0\.5'"),
    (b"id,x,y\na,0.5,0.5\nb,nan,nan\n", r"line 3 \(id 'b'\): column 'x' is 'nan'"),
    (b"id,x,y\na,0.5,0.5\nb,0.25,0.25\n", r"line 3 \(id 'b'\): the probabilities sum to 0\.5, not 1"),
])
def test_empty_binary_or_bad_predictions_file_is_named_with_what_is_wrong(tmp_path, content, match):
    """#20 items 4 and 8: the file and row named, not 'the dataset has no test images'; nothing written."""
    run = make_run(tmp_path / "run", ["a", "b"], ["x", "y"], "folders")
    (run / "test_predictions.csv").write_bytes(content)
    with pytest.raises(FeatstackError, match=match):
        submit(run, submissions_dir=tmp_path / "subs")
    assert not (tmp_path / "subs").exists()


def test_missing_predictions_file_is_named_in_full(tmp_path):
    """#20 item 8: the whole path, not one cut mid-word."""
    run = make_run(tmp_path / ("a-long-folder-name-" * 4) / "run", ["a"], ["x", "y"], "folders")
    (run / "test_predictions.csv").unlink()
    with pytest.raises(FeatstackError) as err:
        submit(run, submissions_dir=tmp_path / "subs")
    assert str(err.value).startswith(f"{run / 'test_predictions.csv'}: no such file; "), str(err.value)


def test_log_keeps_the_columns_and_rows_it_does_not_know(tmp_path):
    """#20 item 3: a user's lb_score column, and a log with another header, survive the next submit.py."""
    subs = tmp_path / "subs"
    run = make_run(tmp_path / "run", ["1", "2"], ["cat", "dog"], "cats-dogs")
    submit(run, submissions_dir=subs)
    log = subs / "log.csv"
    frame = pd.read_csv(log, dtype=str, keep_default_na=False)
    frame["lb_score"] = ["0.41234"]
    frame.to_csv(log, index=False)  # the user's column, as pandas (or a spreadsheet) saves it
    before = log.read_bytes()
    submit(run, submissions_dir=subs)
    assert log.read_bytes().startswith(before)  # append-only: every byte kept
    back = pd.read_csv(log, dtype=str, keep_default_na=False)
    assert list(back.columns) == list(frame.columns) and list(back.lb_score) == ["0.41234", ""]
    assert list(back.run_id) == ["run", "run"] and list(back.status) == ["written", "written"]

    # Another header altogether, its last line without a line break: its rows stay, featstack's columns join it.
    log.write_text('date,run,lb_score,notes\n2025-01-01,r1,0.5,"first, try"\n2025-01-02,r2,,')
    submit(run, submissions_dir=subs)
    lines = log.read_text().splitlines()
    assert lines[1:3] == ['2025-01-01,r1,0.5,"first, try"', "2025-01-02,r2,,"] and len(lines) == 4
    back = pd.read_csv(log, dtype=str, keep_default_na=False)
    assert list(back.columns[:4]) == ["date", "run", "lb_score", "notes"] and "run_id" in back.columns
    assert back.notes[0] == "first, try" and back.lb_score[0] == "0.5" and back.run_id[2] == "run"


@pytest.mark.parametrize("content, match", [
    (b"time,run_id,message\n2025-01-01,r1,caf\xe9 cr\xe8me\n", r"log\.csv: not UTF-8 text \(byte 37\)"),
    (b"\x00\x01\x02PK\x03\x04", r"log\.csv: binary content \(a NUL byte at byte 0\)"),
    ("time,run_id\n2025,r1\n".encode("utf-16"), r"log\.csv: UTF-16 text, not UTF-8"),
    (b'time,run_id,message\n2025-01-01,r1,"never closed\n', r"log\.csv: not a readable CSV table"),
])
def test_unreadable_log_stops_submit_before_anything_is_written(tmp_path, fake_kaggle, monkeypatch, content, match):
    """#20 item 3: one line, exit 2, no submission file, no kaggle call, the log untouched."""
    monkeypatch.setenv("KAGGLE_API_TOKEN", "tok-123456")
    subs = tmp_path / "subs"
    subs.mkdir()
    (subs / "log.csv").write_bytes(content)
    run = make_run(tmp_path / "run", ["1", "2"], ["cat", "dog"], "cats-dogs")
    with pytest.raises(FeatstackError, match=match + r".*only ever appended to, so nothing was written"):
        submit(run, competition="c", message="m", submissions_dir=subs)
    assert [p.name for p in subs.iterdir()] == ["log.csv"] and (subs / "log.csv").read_bytes() == content
    assert not _calls(fake_kaggle["record"])
    if b"caf" in content:  # the same from the command line: one line, exit 2
        proc = subprocess.run([sys.executable, str(ROOT / "submit.py"), "--run", str(run), "--submissions-dir",
                               str(subs)], capture_output=True, text=True)
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith(f"error: {subs / 'log.csv'}: ")
        assert [p.name for p in subs.iterdir()] == ["log.csv"]


# Last in the file: the demo is built once per run by the first worker that needs it; tests before this one
# run meanwhile instead of waiting on its lock.
def test_demo_submission_matches_its_sample(demo, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "submit.py"), "--run", str(demo["run"]),
                           "--submissions-dir", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.strip().splitlines()[-1]
    written = pd.read_csv(out, dtype={"id": str})
    sample = pd.read_csv(demo["data"] / "sample_submission.csv", dtype={"id": str})
    assert list(written.columns) == list(sample.columns) and list(written.id) == list(sample.id)
    validate(written, list(sample.id), list(sample.columns), "multiclass")
