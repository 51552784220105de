"""Using a trained network: the predictor (the one inference path), checkpoint loading, evaluate, predict,
export and prediction timing."""
