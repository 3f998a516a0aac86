"""Deploy step on Kubernetes: release a model to the serving Deployment, watch it, roll back on failure.

What one release does (``deploy_kubernetes``), in phases; nothing on the cluster changes
before the third, and every failure after it ends in a known state:

1. Preflight: check the inputs (model artifact, test images, the clients' token file) and
   read the live serving Deployment (installed once with ``kubectl apply -k
   manifests/overlays/<env>``; this step changes only the release fields of it, never
   sizes, placement or security), the revision it serves and the Service in front of it.
2. Publish: pack the model into ``<model>.mar`` and publish it to the model store with
   ``components.core.releases.publish``: a content-addressed release whose id (a sha256) the
   pods' init container fetches, so a revision always means the same bytes.
3. Apply and wait: render the release, a server-side-apply configuration holding only the
   release fields (``release.render_release``): the init container's ``KFP_MLOPS_MODEL_URI``
   and ``KFP_MLOPS_MODEL_VERSION`` (the release id), the ``kfp-mlops.io/model-version`` and
   ``app.kubernetes.io/version`` labels, the ``kubernetes.io/change-cause`` annotation (what
   ``kubectl rollout history`` lists), the release id as a pod annotation, and the image when
   one is given; everything else stays with whoever applied the manifests. Server-side apply
   it (field manager ``kfp-mlops``, conflicts forced: the release fields are this step's),
   then wait for the rollout the way ``kubectl rollout status`` does (observedGeneration,
   updated/available replicas, the Progressing condition's ProgressDeadlineExceeded), failing
   early when a new pod crash-loops or cannot pull. Then smoke-test through the Service (its
   cluster DNS name, with the clients' bearer token: the pods' auth proxy checks it),
   expecting the new model version to answer.
4. Recover, on any failure in 3: roll back to the revision that served before, exactly as
   ``kubectl rollout undo`` does (the previous ReplicaSet's pod template, patched in), and
   wait for that rollout too; the step then fails with both outcomes in its message. With
   no earlier release to return to (the first release), scale the Deployment to 0 instead,
   so the failed model serves nothing. A rollback that fails too is an error naming both
   failures and the kubectl commands to finish by hand.

With ``rollout.strategy`` shadow or canary and a release already serving, the new model first
runs as the challenger Deployment beside the stable one and is promoted through phase 3, or
scaled back to 0, on the evidence of the stable pods' auth proxies (``staged``; docs/releases.md).

The modules: ``api`` (the Kubernetes calls, through the official client's ``ApiClient``,
and what each needs of the pipeline's Role), ``release`` (the ``Release`` and its patches),
``rollout`` (watching a rollout, finding the previous revision), ``deploy`` (the phases),
``challenger`` (the challenger Deployment and the rollout file, as objects and patches),
``evidence`` (the stable pods' ``GET /rollout``, summed) and ``staged`` (the shadow and
canary phases).
The tests point a real ``ApiClient`` at a local HTTP server that replays recorded API objects
(tests/data/k8s/) and authorizes every call against the pipeline's Role, as the API server would.
"""

from components.deploy.kubernetes.api import KubernetesApi
from components.deploy.kubernetes.deploy import TOKEN_FILE, TOKEN_SECRET, KubernetesDeploy, deploy_kubernetes
from components.deploy.kubernetes.release import DeployError, Release, ReleaseRolledBack, RollbackFailed

__all__ = ["TOKEN_FILE", "TOKEN_SECRET", "DeployError", "KubernetesApi", "KubernetesDeploy", "Release",
           "ReleaseRolledBack", "RollbackFailed", "deploy_kubernetes"]
