"""Quality indices of fused images, matching the MATLAB toolbox of Vivone et al. (DLPan-Toolbox version).

Pure functions on numpy `(C, H, W)` arrays in DN; `mask` arguments are `(H, W)` bool, True = valid.

* Reduced resolution (a reference exists): `q2n`, `q_index`, `sam`, `ergas`, `scc`, `psnr`, `ssim`,
  `rmse`, and `reduced_resolution` for all of them at once.
* Full resolution (no reference): `d_lambda`, `d_s`, `qnr`, `d_lambda_khan`, `hqnr`, the sharpness
  index `hpc` (high-pass correlation with the PAN), and `full_resolution` for all of them at once.

`table` lists them (name, function, resolution, direction, unit, note): what every command that shows
or compares indices reads. A new index is its function and one entry there; a full-resolution one
also adds its sums to the row strips of `fullres` (scenes are not filtered whole).
"""

from fusion_cli.metrics._common import border_cut, clip_to_bits, holds_whole_dn, round_uint16
from fusion_cli.metrics.noreference import (
    d_lambda,
    d_lambda_khan,
    d_s,
    d_s_bands,
    hqnr,
    pan_lowpass,
    qnr,
    upsample,
)
from fusion_cli.metrics.q2n import q2n, q2n_label, q2n_map
from fusion_cli.metrics.reference import (
    ergas,
    ergas_bands,
    parse_peak,
    psnr,
    psnr_bands,
    q_index,
    q_index_bands,
    rmse,
    rmse_bands,
    sam,
    sam_map,
    scc,
    scc_bands,
    ssim,
    ssim_bands,
)
from fusion_cli.metrics.sharpness import hpc, hpc_bands
from fusion_cli.metrics.table import Metric, full_resolution, reduced_resolution, register

__all__ = [
    "Metric",
    "register",
    "d_lambda",
    "d_lambda_khan",
    "d_s",
    "d_s_bands",
    "full_resolution",
    "hpc",
    "hpc_bands",
    "hqnr",
    "pan_lowpass",
    "qnr",
    "upsample",
    "border_cut",
    "clip_to_bits",
    "ergas",
    "ergas_bands",
    "parse_peak",
    "psnr",
    "psnr_bands",
    "q2n",
    "q2n_label",
    "q2n_map",
    "q_index",
    "q_index_bands",
    "reduced_resolution",
    "rmse",
    "rmse_bands",
    "holds_whole_dn",
    "round_uint16",
    "sam",
    "sam_map",
    "scc",
    "scc_bands",
    "ssim",
    "ssim_bands",
]
