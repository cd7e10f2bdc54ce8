"""Deployment: ONNX export and torch.export of models built on the dcnv2
operators.

- `dcnv2_plugin.export.onnx_export`: the operators' ONNX translations
  (`onnx_translation_table`) and `export_onnx`; needs onnxscript and onnx
  (the `export` extra).
- `dcnv2_plugin.export.runtime`: ONNX Runtime CPU sessions; needs onnxruntime.
- `dcnv2_plugin.export.detector`: `ExportableRCNN`, a detectron2 R-CNN's
  inference on one image in a form torch.export traces; needs detectron2.

Importing this package imports none of them.
"""
