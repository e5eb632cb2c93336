"""What a run leaves behind beside its model (docs/run-record.md): the metric history (`history`), the model card
(`card`) and the plots (`plots`); and `kubetune report`'s HTML page about one run or several (`report`)."""
