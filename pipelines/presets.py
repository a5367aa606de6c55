"""Named PatchNet training settings, declared once.

`patchnet train`'s flags default to the paper's subnet (7 conv layers of 64
filters, patch 21, same padding, disjoint patches, Adam 1e-4, batch 4).
`CPU` is the CPU-sized PatchNet that `patchnet compare`, `patchnet demo`
and the tests train, and what we recommend for `patchnet train` on a CPU:

    patchnet train DATA --out RUN --image-size 64x64 --patch-size 15 --stride 3 --padding valid \\
        --filters 16 --conv-layers 3 --learning-rate 3e-3 --batch-size 8 --epochs 150

Why these values: overlapping training patches (`stride=3`), which a valid
subnet computes fully convolutionally at about the cost of disjoint ones,
changed the mask AUROC more than any other setting we measured, most on
sparse evidence (docs/results/comparison.md has the ablation and its cost: a too
bright outer ring of one or two pixels; stride 1 makes it worse). No
TensorFlow here: command-line flags read these values before TensorFlow is
imported.
"""


def cpu_stride(padding):
    """CPU's training stride for a subnet padding: overlapping patches for a valid subnet (computed
    fully convolutionally), disjoint ones (None) for a same-padded subnet, whose patches cost one
    subnet call each."""
    return CPU["stride"] if padding == "valid" else None


CPU = {
    "patch_size": 15,
    "stride": 3,
    "padding": "valid",
    "filters": 16,
    "conv_layers": 3,
    "learning_rate": 3e-3,
    "batch_size": 8,
    "epochs": 150,
    "patience": 20,
}
