"""Tests of the pretrain and finetune steps: their plain functions and components, retries that resume,
DDP through torchrun, the pretrain command line, and the multi-node TrainJob branch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import settings_of

from components.core.data import load_splits
from components.core.models import (
    ENCODER_FILE,
    METADATA_FILE,
    WEIGHTS_FILE,
    load_classifier,
    load_encoder,
)
from components.finetune.finetune import finetune, weights_hash
from components.pretrain.pretrain import pretrain
from components.train.loops import epoch_batches, finetune_classifier, predict_logits, subsample_labels
from pipelines.config import DataConfig, FinetuneConfig, PretrainConfig

QUIET = lambda line: None  # noqa: E731
TINY_PRETRAIN = dict(objective="contrastive", epochs=2, batch_size=128, learning_rate=3e-3, temperature=0.2,
                     width=8, embed_dim=16, seed=0)
TINY_FINETUNE = dict(epochs=3, batch_size=64, learning_rate=5e-3, patience=3, label_fraction=0.5, seed=0)


def pretrain_settings(**values):
    """A pretrain step's cfg: seed in the data area, the rest in pretrain."""
    values = dict(values)
    return settings_of(data=DataConfig(seed=values.pop("seed", 0)), pretrain=PretrainConfig(**values))


def finetune_settings(**values):
    values = dict(values)
    return settings_of(data=DataConfig(seed=values.pop("seed", 0)), finetune=FinetuneConfig(**values))


def test_pretrain_then_finetune_write_artifacts_that_load_back(tmp_path, dataset_dir, splits):
    summary = pretrain(dataset_dir, tmp_path / "encoder", pretrain_settings(**TINY_PRETRAIN), log=QUIET)
    assert {p.name for p in (tmp_path / "encoder").iterdir()} == {ENCODER_FILE, METADATA_FILE}
    encoder, enc_meta = load_encoder(tmp_path / "encoder")
    assert enc_meta["objective"] == "contrastive" and enc_meta["epochs"] == 2 and enc_meta["seed"] == 0
    assert enc_meta["n_images"] == summary["n_images"] == len(splits.pool_x) + len(splits.train_x)
    assert enc_meta["final_loss"] == summary["final_loss"] and np.isfinite(summary["final_loss"])

    result = finetune(dataset_dir, tmp_path / "encoder", tmp_path / "model", finetune_settings(**TINY_FINETUNE),
                      log=QUIET)
    assert {p.name for p in (tmp_path / "model").iterdir()} == {WEIGHTS_FILE, METADATA_FILE}
    model, meta = load_classifier(tmp_path / "model")
    assert meta["class_names"] == splits.class_names
    assert meta["model_version"] == result["model_version"] == weights_hash(model.state_dict())
    assert meta["label_counts"] == {str(c): max(1, round(0.5 * int(np.sum(splits.train_y == c)))) for c in range(10)}
    assert meta["n_labeled"] == sum(meta["label_counts"].values())
    assert 1 <= meta["best_epoch"] <= 3 and 0 <= meta["val_accuracy"] <= 1
    assert meta["pretrain"]["objective"] == "contrastive"

    # The artifact predicts exactly what the in-memory model predicts (same seed, same weights).
    same_settings = {k: getattr(FinetuneConfig(), k)
                     for k in ("min_epoch_samples", "probe_epochs", "encoder_lr_scale")}
    in_memory, _ = finetune_classifier(encoder, load_splits(dataset_dir), **TINY_FINETUNE, **same_settings, log=QUIET)
    assert torch.equal(predict_logits(model, splits.test_x).argmax(1), predict_logits(in_memory, splits.test_x).argmax(1))
    assert torch.allclose(predict_logits(model, splits.test_x), predict_logits(in_memory, splits.test_x))


def test_components_log_metrics_into_kfp_artifacts(tmp_path, dataset_dir):
    from kfp import dsl

    from components.finetune.component import finetune_component
    from components.pretrain.component import pretrain_component

    dataset = dsl.Dataset(uri=str(dataset_dir))
    encoder = dsl.Model(uri=str(tmp_path / "encoder"))
    pretrain_metrics = dsl.Metrics(uri=str(tmp_path / "pretrain_metrics"))
    pretrain_component(dataset=dataset, encoder=encoder, metrics=pretrain_metrics, cfg=pretrain_settings(**TINY_PRETRAIN))
    assert (tmp_path / "encoder" / ENCODER_FILE).is_file()
    assert {"pretrain_final_loss", "n_images", "cost_wall_seconds"} <= set(pretrain_metrics.metadata)

    model = dsl.Model(uri=str(tmp_path / "model"))
    finetune_metrics = dsl.Metrics(uri=str(tmp_path / "finetune_metrics"))
    finetune_component(dataset=dataset, encoder=encoder, model=model, metrics=finetune_metrics,
                       cfg=finetune_settings(**TINY_FINETUNE))
    meta = json.loads((tmp_path / "model" / METADATA_FILE).read_text())
    assert finetune_metrics.metadata["val_accuracy"] == pytest.approx(meta["val_accuracy"])
    assert finetune_metrics.metadata["n_labeled"] == meta["n_labeled"]
    assert model.metadata["model_version"] == meta["model_version"]

    # The pipeline builds their KFP components at compile time; they must be valid ones.
    from pipelines.pipeline import step_component

    for step in ("pretrain", "finetune"):
        step_component(step)


@pytest.mark.slow
def test_default_config_reaches_the_accuracy_target(tmp_path, dataset_dir, splits):
    """The hard requirement: with the default settings, digits reach >= 0.95 test accuracy."""
    import time

    t0 = time.perf_counter()
    pretrain(dataset_dir, tmp_path / "encoder", settings_of(data=DataConfig(seed=0), pretrain=PretrainConfig()))
    finetune(dataset_dir, tmp_path / "encoder", tmp_path / "model",
             settings_of(data=DataConfig(seed=0), finetune=FinetuneConfig()))
    seconds = time.perf_counter() - t0
    model, _ = load_classifier(tmp_path / "model")
    accuracy = (predict_logits(model, splits.test_x).argmax(1).numpy() == splits.test_y).mean()
    print(f"default config: test accuracy {accuracy:.4f} in {seconds:.1f}s")
    assert accuracy >= 0.95


def test_retried_components_resume_from_their_checkpoints(tmp_path, dataset_dir, monkeypatch):
    """A KFP retry runs the component again with the same output URIs: it must resume, not restart."""
    from kfp import dsl

    from components.core.checkpoint import step_checkpoint_dir
    from components.finetune.component import finetune_component
    from components.pretrain.component import pretrain_component
    from components.train.runtime import FAIL_AT_STEP_ENV, InjectedFailure

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR

    dataset = dsl.Dataset(uri=str(dataset_dir))
    encoder = dsl.Model(uri=str(tmp_path / "encoder"))
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "12")  # epoch 2 of pretraining (9 steps per epoch)
    pretrain_args = dict(TINY_PRETRAIN, epochs=3)
    with pytest.raises(InjectedFailure):
        pretrain_component(dataset=dataset, encoder=encoder, metrics=dsl.Metrics(uri=str(tmp_path / "m0")),
                           cfg=pretrain_settings(**pretrain_args))
    metrics = dsl.Metrics(uri=str(tmp_path / "m1"))
    pretrain_component(dataset=dataset, encoder=encoder, metrics=metrics, cfg=pretrain_settings(**pretrain_args))
    assert metrics.metadata["pretrain_resumed_from_step"] == 9
    assert not (tmp_path / "tmp" / "kfp-mlops-checkpoints" / "pretrain").exists() or \
        not any((tmp_path / "tmp" / "kfp-mlops-checkpoints" / "pretrain").iterdir())  # cleaned up after success
    assert step_checkpoint_dir("pretrain", encoder.uri).startswith(str(tmp_path / "tmp"))

    model = dsl.Model(uri=str(tmp_path / "model"))
    n_labeled = len(subsample_labels(load_splits(dataset_dir).train_y, TINY_FINETUNE["label_fraction"], 0))
    per_epoch = len(epoch_batches(n_labeled, TINY_FINETUNE["batch_size"], 0, 0, min_samples=512))
    monkeypatch.setenv(FAIL_AT_STEP_ENV, str(per_epoch + 2))  # early in epoch 2
    with pytest.raises(InjectedFailure):
        finetune_component(dataset=dataset, encoder=encoder, model=model,
                           metrics=dsl.Metrics(uri=str(tmp_path / "m2")),
                           cfg=finetune_settings(**TINY_FINETUNE, min_epoch_samples=512))
    metrics = dsl.Metrics(uri=str(tmp_path / "m3"))
    finetune_component(dataset=dataset, encoder=encoder, model=model, metrics=metrics,
                       cfg=finetune_settings(**TINY_FINETUNE, min_epoch_samples=512))
    assert metrics.metadata["finetune_resumed_from_step"] == per_epoch  # the checkpoint at the end of epoch 1


# --- DDP through torchrun (gloo on CPU) ----------------------------------------------------------

def test_torchrun_with_two_processes_writes_one_encoder(tmp_path, dataset_dir):
    lines = []
    summary = pretrain(dataset_dir, tmp_path / "encoder", pretrain_settings(**dict(TINY_PRETRAIN, epochs=1)),
                       log=lines.append, nproc_per_node=2)
    assert sorted(p.name for p in (tmp_path / "encoder").iterdir()) == [ENCODER_FILE, METADATA_FILE]
    meta = json.loads((tmp_path / "encoder" / METADATA_FILE).read_text())
    assert meta["world_size"] == summary["world_size"] == 2 and meta["device"] == "cpu"
    assert any("2 processes (DDP)" in line for line in lines)
    hashes = next(line for line in lines if line.startswith("rank weight hashes:")).split(":")[1].split()
    assert len(hashes) == 2 and hashes[0] == hashes[1] == meta["weights_sha256"][:16]  # ranks stayed in sync
    assert load_encoder(tmp_path / "encoder")[0].spec.width == 8


@pytest.mark.slow
def test_an_interrupted_ddp_run_resumes_to_the_same_weights(tmp_path, dataset_dir, monkeypatch):
    """torchrun with 2 ranks crashes at step 5, the rerun resumes from step 4 and matches an uninterrupted run."""
    from components.train.runtime import FAIL_AT_STEP_ENV

    args = dict(TINY_PRETRAIN, epochs=2, batch_size=256)  # 4 steps per epoch
    reference = pretrain(dataset_dir, tmp_path / "reference", pretrain_settings(**args), log=QUIET, nproc_per_node=2)
    every_two_steps = pretrain_settings(**args, checkpoint_every_steps=2, checkpoint_every_epochs=0)
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "5")
    with pytest.raises(RuntimeError, match="torchrun pretraining with 2 processes failed"):
        pretrain(dataset_dir, tmp_path / "encoder", every_two_steps, log=QUIET, nproc_per_node=2,
                 checkpoint_dir=tmp_path / "ckpt")
    assert not (tmp_path / "encoder" / ENCODER_FILE).exists()
    resumed = pretrain(dataset_dir, tmp_path / "encoder", every_two_steps, log=QUIET, nproc_per_node=2,
                       checkpoint_dir=tmp_path / "ckpt")
    assert resumed["resumed_from_step"] == 4
    assert resumed["weights_sha256"] == reference["weights_sha256"]
    assert resumed["final_loss"] == reference["final_loss"]


def test_the_command_line_defaults_are_the_pipeline_defaults():
    """Run by hand, the torchrun entry trains what the pipeline's default settings would."""
    from components.pretrain.pretrain import FLAG_FIELDS, build_parser, settings_from_args

    cfg = settings_from_args(build_parser().parse_args(["--dataset", "d", "--out", "o"]))
    defaults = PretrainConfig()
    assert {name: getattr(cfg.pretrain, name) for name in FLAG_FIELDS} == \
        {name: getattr(defaults, name) for name in FLAG_FIELDS}
    assert cfg.data.seed == DataConfig().seed


def test_the_command_line_carries_every_setting_pretrain_reads():
    """What the torchrun launcher and the TrainJob pass comes back as the same settings on every rank."""
    from components.pretrain.pretrain import (
        FLAG_FIELDS,
        build_parser,
        cli_flags,
        command_line_values,
        settings_from_args,
    )

    cfg = pretrain_settings(**dict(TINY_PRETRAIN, seed=7, objective="masked"), arch="vgg", depth=11, compile=True,
                            checkpoint_every_steps=5, checkpoint_every_epochs=0)
    back = settings_from_args(build_parser().parse_args(["--dataset", "d", "--out", "o"]
                                                        + cli_flags(command_line_values(cfg))))
    assert back.data.seed == 7
    assert {name: getattr(back.pretrain, name) for name in FLAG_FIELDS} == \
        {name: getattr(cfg.pretrain, name) for name in FLAG_FIELDS}


def test_the_command_line_trains_from_local_paths(tmp_path, dataset_dir, capsys):
    from components.pretrain.pretrain import main

    code = main(["--dataset", str(dataset_dir), "--out", str(tmp_path / "enc"), "--epochs", "1", "--batch-size",
                 "128", "--width", "8", "--embed-dim", "16", "--arch", "vgg", "--depth", "11",
                 "--checkpoint-dir", str(tmp_path / "ckpt"), "--nproc-per-node", "1"])
    assert code == 0
    encoder, meta = load_encoder(tmp_path / "enc")
    assert (encoder.spec.arch, encoder.spec.depth, meta["depth"]) == ("vgg", 11, 11)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["pretrain_summary"]["world_size"] == 1
    assert (tmp_path / "ckpt" / "latest.json").is_file()


# --- several nodes: the TrainJob branch of the pretrain component --------------------------------

class SimulatedTrainer:
    """Stands in for CustomObjectsApi and the Trainer controller.

    create: records the TrainJob and runs its node command in this process (one node, one rank),
    reading the dataset from and writing the encoder to S3 exactly as a node would;
    get: returns the object with the Complete condition the controller sets.
    """

    def __init__(self):
        self.created: dict | None = None

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **kwargs):
        from components.pretrain.pretrain import main

        self.created = json.loads(json.dumps(body))
        trainer = body["spec"]["trainer"]
        assert trainer["command"] == ["torchrun", "--module", "components.pretrain.pretrain"]
        assert main(trainer["args"] + ["--nproc-per-node", "1"]) == 0
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs):
        assert self.created is not None and name == self.created["metadata"]["name"]
        return {**self.created, "status": {"conditions": [
            {"type": "Complete", "status": "True", "reason": "AllJobsCompleted", "message": "jobset completed"}]}}


@pytest.fixture(scope="module")
def moto_server():
    from s3server import MotoServer

    with MotoServer() as server:
        yield server


def test_multinode_pretraining_runs_a_trainjob_through_the_exchange(tmp_path, dataset_dir, moto_server, monkeypatch):
    from kfp import dsl
    from s3server import s3_env

    import components.train.trainjob as trainjob
    from components.core.blobs import Storage, list_uris
    from components.pretrain.component import pretrain_component

    for name, value in s3_env(moto_server.endpoint).items():
        monkeypatch.setenv(name, value)
    Storage().client.create_bucket(Bucket="exchange")
    fake = SimulatedTrainer()
    monkeypatch.setattr(trainjob, "load_custom_objects_api", lambda: fake)
    monkeypatch.setenv("POD_NAMESPACE", "team-a")

    encoder = dsl.Model(uri=str(tmp_path / "encoder"))
    metrics = dsl.Metrics(uri=str(tmp_path / "metrics"))
    pretrain_component(dataset=dsl.Dataset(uri=str(dataset_dir)), encoder=encoder, metrics=metrics,
                       cfg=pretrain_settings(**dict(TINY_PRETRAIN, epochs=1), num_nodes=3, gpus_per_node=2,
                                             exchange_uri="s3://exchange/x"),
                       trainjob_image="registry.example/kfp-mlops:1.2-cuda", trainjob_s3_key_source="s3-keys")

    job = fake.created
    trainer = job["spec"]["trainer"]
    assert job["metadata"]["namespace"] == "team-a"
    assert (trainer["numNodes"], trainer["numProcPerNode"], trainer["image"]) == (3, 2, "registry.example/kfp-mlops:1.2-cuda")
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "2"
    args = trainer["args"]
    flag = lambda name: args[args.index(name) + 1]  # noqa: E731
    assert flag("--dataset").startswith("s3://exchange/x/pretrain/") and flag("--out").endswith("/encoder")
    assert flag("--checkpoint-dir").endswith("/checkpoints") and flag("--width") == "8"
    assert {"name": "S3_ENDPOINT_URL", "value": moto_server.endpoint} in trainer["env"]
    assert any(e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == "s3-keys" for e in trainer["env"])
    assert any(u.endswith("/dataset/train_x.npy") or "/dataset/" in u for u in list_uris(flag("--dataset")))
    # The encoder the "node" uploaded came back into the step's output artifact.
    assert sorted(p.name for p in (tmp_path / "encoder").iterdir()) == [ENCODER_FILE, METADATA_FILE]
    assert metrics.metadata["pretrain_final_loss"] == load_encoder(tmp_path / "encoder")[1]["final_loss"]


def test_multinode_without_an_exchange_says_what_to_configure(tmp_path, dataset_dir, monkeypatch):
    from kfp import dsl

    from components.pretrain.component import pretrain_component

    monkeypatch.setenv("POD_NAMESPACE", "team-a")
    with pytest.raises(ValueError, match=r"pretrain.num_nodes=2 needs pretrain.exchange_uri: an s3:// prefix"):
        pretrain_component(dataset=dsl.Dataset(uri=str(dataset_dir)), encoder=dsl.Model(uri=str(tmp_path / "e")),
                           metrics=dsl.Metrics(uri=str(tmp_path / "m")),
                           cfg=pretrain_settings(**TINY_PRETRAIN, num_nodes=2), trainjob_image="img")
