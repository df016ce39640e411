"""Evaluation of trained models: predictions, accuracy metrics, baselines, training curves, figures.

Modules (imported by name, nothing re-exported here):
- ``predict``: writes ``<model>_pred.h5ad`` / ``<model>_real.h5ad`` pairs.
- ``layout``: reads that layout (settings in ``uns["stlib"]``, groups, matching controls).
- ``metrics``: gene correlation, cell distance, direction cosine, temporal coherence, MSE; CSV export.
- ``baselines``: control-mean and mean-shift reference predictions in the same layout.
- ``tensorboard``: scalars and text from run dirs; training-dynamics table (losses, grad-norm spikes).
- ``plots``: loss curves, grad norms, one shared UMAP of all models, metric heatmaps (matplotlib Figures).
"""
