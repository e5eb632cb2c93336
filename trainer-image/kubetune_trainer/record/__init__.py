"""What a run leaves behind beside its model (docs/run-record.md): the metric history (`history`), the model card
(`card`) and the plots (`plots`)."""
