"""From labelled recordings to shippable weights and their measured card.

``dataset`` (the layout a site produces), ``train`` (the paper's loss and loop), ``fitting``
(train, calibrate on held-out infants, describe the training domain), ``calibration`` (Platt,
thresholds), ``evaluate`` (the paper's metrics, intervals, abstention) and ``model_card``. Needs
the ``train`` extra (torch, scikit-learn); screening needs none of it.
"""
