"""linreg.prototxt written with NetSpec: ``python linreg_netspec.py > linreg.prototxt`` gives the
same net (without the comments).

Keywords go to the layer's own ``<type>_param`` message (``num_output`` -> inner_product_param,
``module`` -> python_param) or, failing that, to the layer itself (``loss_weight``); ``param`` and
``*_param`` keywords always go to the layer.
"""
import caffe
from caffe import layers as L


def linreg(batch=16, inputs=4, outputs=3):
    n = caffe.NetSpec()
    n.x = L.DummyData(shape=dict(dim=[batch, inputs]), data_filler=dict(type="gaussian", std=1))
    n.y = L.InnerProduct(n.x, name="teacher", num_output=outputs, param=[dict(lr_mult=0)] * 2,
                         weight_filler=dict(type="gaussian", std=1), bias_filler=dict(type="gaussian", std=1))
    n.pred = L.InnerProduct(n.x, num_output=outputs, weight_filler=dict(type="xavier"),
                            bias_filler=dict(type="constant", value=0))
    n.loss = L.Python(n.pred, n.y, module="pyloss", layer="EuclideanLossLayer", loss_weight=1)
    net = n.to_proto()
    net.name = "LinearRegressionPython"
    return net


if __name__ == "__main__":
    print(linreg(), end="")
