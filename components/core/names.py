"""Every name the code shares with ``manifests/``, written once.

Kubernetes objects, Secrets and where they are mounted, labels, annotations and
environment variables that both the Python code and the YAML use. The code
imports them from here; tests/test_manifests.py checks the rendered YAML against
them, so a rename on one side fails the tests instead of the cluster.
"""

# -- Kubernetes objects
SERVING_DEPLOYMENT = "kfp-mlops-serving"  # also the name of its Service
STORAGE_CONFIG_MAP = "kfp-mlops-storage"  # non-secret object-store settings, as env
PIPELINE_SERVICE_ACCOUNT = "kfp-mlops-pipeline"
# Shadow and canary rollouts (components/deploy/kubernetes/staged.py): the challenger beside the stable Deployment
SERVING_CHALLENGER = "kfp-mlops-serving-challenger"  # the challenger's Deployment (0 replicas between rollouts) and Service
ROLLOUT_CONFIG_MAP = "kfp-mlops-serving-rollout"  # the stable pods' auth-proxy rollout file ("{}": no challenger)
CHALLENGER_ROLLOUT_CONFIG_MAP = "kfp-mlops-serving-challenger-rollout"  # always "{}": a challenger has no challenger
ROLLOUT_FILE_KEY = "rollout.json"  # the key of both, a file in the auth-proxy container

# -- Secrets (a token or key per line / per key) and where they are mounted
PIPELINE_S3_SECRET = "kfp-mlops-s3"  # the pipeline steps' object-store keys
SERVING_TOKEN_SECRET = "kfp-mlops-serving-token"  # the clients' bearer tokens, checked by the auth proxy
SERVING_SOURCE_TOKEN_SECRET = "kfp-mlops-serving-source-token"  # the pipeline's own token: may tag its traffic
SERVING_SOURCE_TOKEN_MOUNT = "/var/run/secrets/kfp-mlops/serving-source-token"  # in the deploy and monitor steps
SERVING_SOURCE_TOKEN_FILE = f"{SERVING_SOURCE_TOKEN_MOUNT}/token"
PROXY_TOKEN_FILE = "/etc/kfp-mlops/serving-token/token"  # in the serving pods' auth-proxy container
PROXY_SOURCE_TOKEN_FILE = "/etc/kfp-mlops/serving-source-token/token"
TORCHSERVE_KEY_FILE = "/var/run/torchserve/key_file.json"  # TorchServe's keys, as the auth proxy sees them
PROXY_ROLLOUT_FILE = f"/etc/kfp-mlops/rollout/{ROLLOUT_FILE_KEY}"  # --rollout-file: a ConfigMap volume

# -- Labels and annotations
INFERENCE_CLIENT_LABEL = "kfp-mlops.io/inference-client"  # pods the serving NetworkPolicy admits
MODEL_VERSION_LABEL = "kfp-mlops.io/model-version"
RELEASE_ANNOTATION = "kfp-mlops.io/model-release"

# -- Environment variables
MODEL_STORE_ENV = "KFP_MLOPS_MODEL_STORE"  # where releases are published (storage ConfigMap)
MODEL_URI_ENV = "KFP_MLOPS_MODEL_URI"  # what the serving pods' init container fetches
MODEL_VERSION_ENV = "KFP_MLOPS_MODEL_VERSION"  # which release of it
REFERENCE_ENV = "KFP_MLOPS_REFERENCE"  # the monitoring reference (storage ConfigMap)
LEDGER_ENV = "KFP_MLOPS_LEDGER"  # the release ledger, a directory or an s3:// prefix (storage ConfigMap)
REQUEST_LOG_ENV = "KFP_MLOPS_REQUEST_LOG_DIR"  # a directory or an s3:// prefix; unset = no request log
REQUEST_LOG_MAX_BYTES_ENV = "KFP_MLOPS_REQUEST_LOG_MAX_BYTES"
REQUEST_LOG_MAX_AGE_ENV = "KFP_MLOPS_REQUEST_LOG_MAX_AGE_S"
REQUEST_LOG_QUEUE_ENV = "KFP_MLOPS_REQUEST_LOG_QUEUE"
REQUEST_LOG_SPOOL_ENV = "KFP_MLOPS_REQUEST_LOG_SPOOL"  # where s3:// logs wait to be uploaded
# The storage ConfigMap's keys the storage steps get as env (components/core/s3_client.py reads the first four;
# the model store and the release ledger follow).
STORAGE_CONFIG_ENV = ("S3_ENDPOINT_URL", "AWS_REGION", "S3_ADDRESSING_STYLE", "AWS_MAX_ATTEMPTS", MODEL_STORE_ENV,
                      LEDGER_ENV)
