"""`reid-ray doctor`'s Ray section: the version, and the cluster this process would run on."""

from __future__ import annotations

import os

import ray


def check_ray(r, use_ray: bool) -> int:
    """Ray's version and, unless skipped, the cluster's nodes and resources, added to doctor's report `r`
    (rows and problems with their fixes); returns the node count."""

    r.add("ray", "version", ray.__version__)
    if not use_ray:
        r.add("ray", "cluster", "skipped (--no-ray)")
        return 0
    address = os.environ.get("RAY_ADDRESS", "")
    if address.startswith(("http://", "https://")):  # the Jobs API of a remote cluster: not joinable from here
        r.add("ray", "cluster", f"{address} (Jobs API): see the cluster itself with "
                                "`ray job submit -- python -m reid_ray.doctor --data-root /data`")
        return 0
    started = not ray.is_initialized()
    try:
        if started:
            # RAY_ADDRESS or a Ray already running on this node: join it without resources
            # (a job's Ray refuses them); else a local Ray for a moment
            ctx = ray.init(address=address or None, logging_level="ERROR", log_to_driver=False)
        else:
            ctx = None
        gcs = ray.get_runtime_context().gcs_address
        res = ray.cluster_resources()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        dashboard = getattr(ctx, "dashboard_url", "") if ctx is not None else "(already connected)"
    except Exception as e:  # noqa: BLE001 - a cluster we cannot reach is a finding, not a crash
        r.add("ray", "cluster", f"unreachable: {type(e).__name__}: {e}")
        r.problem(f"cannot connect to Ray at {address or 'a new local instance'}",
                  "check RAY_ADDRESS (ray://... or the head's address), RAY_AUTH_MODE=token with the cluster's "
                  "token, or unset RAY_ADDRESS to start a local Ray; --no-ray skips this check")
        return 0
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
    r.add("ray", "cluster", address or f"local ({gcs})")
    r.add("ray", "nodes", str(len(nodes)))
    r.add("ray", "CPUs / GPUs", f"{res.get('CPU', 0):g} / {res.get('GPU', 0):g}")
    r.add("ray", "dashboard", dashboard or "off")
    if not dashboard:
        r.problem("the Ray dashboard is off: Ray Train V2 cannot free a stopped trial's workers",
                  "install ray[default] and start Ray without --include-dashboard=false")
    if len(nodes) > 1 and res.get("GPU", 0) == 0:
        r.add("ray", "note", "no GPUs now: an autoscaling cluster (clusters/*.yaml) adds GPU nodes on demand")
    return len(nodes)
