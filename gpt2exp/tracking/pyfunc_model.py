"""MLflow models-from-code file of gpt2exp's pyfunc: stored in each logged model as plain source and
run by ``mlflow.pyfunc.load_model``; it only builds the model class of the installed gpt2exp."""

import mlflow.models

from gpt2exp.tracking.pyfunc import GPTPyfunc

mlflow.models.set_model(GPTPyfunc())
