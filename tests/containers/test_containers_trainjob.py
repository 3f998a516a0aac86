"""The rendered multi-node pretraining TrainJob, run for real: two node pods of the pipeline image on one network.

components/train/trainjob.py renders the TrainJob the pretrain step creates; components/deploy/pods turns it into
the pods the Trainer would run (the torch-distributed runtime's ``PET_*`` variables, JobSet's names) and runs them
on this machine's Docker engine: ``torchrun`` in each finds node 0 by its DNS name, Gloo carries DDP on CPU, the
dataset comes from and the encoder goes to a real S3 server (moto, on the pods' network gateway). The encoder must
load like a single-node one and be the very encoder two processes of DDP on one machine train. Skipped, with the
reason, without an engine or the images (`make image`); failed instead under `make test CONTAINERS=require` (CI).
"""

from __future__ import annotations

import json
import os
import re
import uuid

import pytest
from conftest import digits_splits

from components.core import blobs, names
from components.core.data import save_splits
from components.core.models import ENCODER_FILE, METADATA_FILE, load_encoder
from components.deploy import pods
from components.train.trainjob import TrainJobSpec, render_trainjob, trainjob_name, validate_trainjob

NODES = 2
TINY = dict(objective="contrastive", epochs=2, batch_size=128, learning_rate=3e-3, temperature=0.2, width=8,
            embed_dim=16, seed=0)


def test_the_trainjobs_pods_are_the_torch_plugins():
    """Without an engine: names, rendezvous and ranks as the Trainer's Torch plugin and JobSet set them."""
    job = render_trainjob(TrainJobSpec(name="pretrain-abc", namespace="team", image="img:1", dataset_uri="s3://b/d",
                                       output_uri="s3://b/o", num_nodes=3, gpus_per_node=0, cpu_per_node="2",
                                       memory_per_node="4Gi", env={"AWS_REGION": "eu"}, s3_secret_name="keys"))
    node_pods = pods.trainjob_pods(job)
    assert [p["metadata"]["name"] for p in node_pods] == ["pretrain-abc-node-0-0", "pretrain-abc-node-0-1",
                                                         "pretrain-abc-node-0-2"]
    for rank, pod in enumerate(node_pods):
        spec = pod["spec"]
        assert (spec["hostname"], spec["subdomain"]) == (pod["metadata"]["name"], "pretrain-abc")
        node = spec["containers"][0]
        assert (node["image"], node["command"], node["args"]) == ("img:1", job["spec"]["trainer"]["command"],
                                                                 job["spec"]["trainer"]["args"])
        assert node["resources"] == job["spec"]["trainer"]["resourcesPerNode"]
        env = pods.manifests.container_env(node, {**pod, "podIP": "10.0.0.1"}, {}, {"keys": {
            "AWS_ACCESS_KEY_ID": b"a", "AWS_SECRET_ACCESS_KEY": b"s"}})
        assert env["PET_NODE_RANK"] == env["JOB_COMPLETION_INDEX"] == str(rank)
        assert (env["PET_NNODES"], env["PET_NPROC_PER_NODE"]) == ("3", "1")
        assert (env["PET_MASTER_ADDR"], env["PET_MASTER_PORT"]) == ("pretrain-abc-node-0-0.pretrain-abc", "29400")
        assert env["AWS_REGION"] == "eu" and env["AWS_SECRET_ACCESS_KEY"] == "s"


@pytest.fixture(scope="module")
def engine(container_engine, project_images):
    """The engine's client, with the pipeline image on it (tests/conftest.py skips otherwise)."""
    return container_engine


@pytest.fixture(scope="module")
def exchange(engine, tmp_path_factory):
    """moto on the pods' network gateway, a bucket, and the digits dataset published to the exchange prefix."""
    from s3server import MotoServer, s3_env

    from components.core.blobs import Storage

    gateway = pods.ensure_network(client=engine)
    with MotoServer(host=gateway) as server:
        patch = pytest.MonkeyPatch()
        for key, value in {**s3_env(server.endpoint), "NO_PROXY": gateway, "no_proxy": gateway}.items():
            patch.setenv(key, value)
        Storage().client.create_bucket(Bucket="kfp-mlops")
        dataset_dir = tmp_path_factory.mktemp("dataset")
        save_splits(digits_splits(), dataset_dir)
        base = f"s3://kfp-mlops/exchange/pretrain/{uuid.uuid4().hex[:12]}"
        blobs.put_dir(dataset_dir, f"{base}/dataset")
        yield {"server": server, "base": base, "dataset_dir": dataset_dir}
        patch.undo()


@pytest.mark.containers
def test_the_rendered_trainjob_trains_on_two_nodes_through_the_exchange(engine, exchange, tmp_path):
    from pipelines.config import ClusterConfig

    base = exchange["base"]
    spec = TrainJobSpec(
        name=trainjob_name("pretrain", base), namespace="kfp-mlops-dev", image=ClusterConfig().image,
        dataset_uri=f"{base}/dataset", output_uri=f"{base}/encoder", num_nodes=NODES, gpus_per_node=0,
        cpu_per_node="1", memory_per_node="2Gi", entry_args=TINY,
        # One thread per process, as torchrun gives each of several processes on one machine: the comparison below
        # is then bit for bit.
        env={**{k: os.environ[k] for k in ("S3_ENDPOINT_URL", "AWS_REGION", "S3_ADDRESSING_STYLE")},
             "OMP_NUM_THREADS": "1"},
        s3_secret_name=names.PIPELINE_S3_SECRET,
    )
    trainjob = render_trainjob(spec)
    validate_trainjob(trainjob)
    keys = {names.PIPELINE_S3_SECRET: {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}}
    started = []
    try:
        for node in pods.trainjob_pods(trainjob):
            started.append(pods.start_pod(node, secrets=keys, client=engine))
        codes = [pod.wait_completed(timeout_s=600)["node"] for pod in started]
        logs = [pod.logs("node") for pod in started]
        ips = {pod.ip for pod in started}
    finally:
        for pod in started:
            pod.stop(grace_period_s=5)
    assert codes == [0] * NODES, "\n\n".join(logs)
    assert len(ips) == NODES, "two pods, two addresses on one network"
    # DDP kept both ranks' weights equal; rank 0 printed them side by side and uploaded the encoder.
    hashes = re.search(r"rank weight hashes: (\S+) (\S+)", logs[0])
    assert hashes and hashes.group(1) == hashes.group(2), logs[0]

    blobs.get_dir(spec.output_uri, tmp_path / "two-nodes")
    encoder, meta = load_encoder(tmp_path / "two-nodes")
    assert sorted(p.name for p in (tmp_path / "two-nodes").iterdir()) == [ENCODER_FILE, METADATA_FILE]
    assert meta["world_size"] == NODES and meta["device"] == "cpu" and meta["weights_sha256"][:16] == hashes.group(1)
    summary = json.loads(logs[0].strip().splitlines()[-1])["pretrain_summary"]
    assert summary["weights_sha256"] == meta["weights_sha256"]

    # Like a single-node encoder: the same network and metadata. And the same weights two DDP processes on this
    # machine train from the same flags: the nodes computed what one machine would.
    from components.pretrain.pretrain import main

    local = [str(tmp_path / "one-node"), str(tmp_path / "ddp-here")]
    args = ["--dataset", str(exchange["dataset_dir"])] + trainjob["spec"]["trainer"]["args"][4:]
    assert main(["--out", local[0], *args, "--nproc-per-node", "1"]) == 0
    single, single_meta = load_encoder(local[0])
    assert single.spec == encoder.spec
    assert {k: v.shape for k, v in single.state_dict().items()} == {k: v.shape for k, v in encoder.state_dict().items()}
    assert set(single_meta) == set(meta) and single_meta["world_size"] == 1
    assert main(["--out", local[1], *args, "--nproc-per-node", str(NODES)]) == 0
    assert load_encoder(local[1])[1]["weights_sha256"] == meta["weights_sha256"]
