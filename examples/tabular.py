"""Real tabular data, as a new user would train it: scikit-learn's bundled data sets (no
download), Adam, a validation split, early stopping that keeps the best weights and a
checkpoint of the best epoch; then the test metrics beside scikit-learn's MLP on the same
split.

    python examples/tabular.py                    # breast cancer: binary classification
    python examples/tabular.py --data digits      # 10 classes (macro-averaged metrics)
    python examples/tabular.py --data diabetes    # regression (r2, mae)

Needs scikit-learn: pip install -c constraints.txt -e ".[examples]".
"""

from __future__ import annotations

import os
import sys
import time
import warnings

import torch
from common import Parser, number

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout
import graphdl as gd  # noqa: E402

TASKS = {  # data set -> (its loader, the kind of task, the metrics reported)
    "breast_cancer": ("load_breast_cancer", "binary", ["accuracy", "precision", "recall", "f1", "auc"]),
    "digits": ("load_digits", "classes", ["accuracy", "precision", "recall", "f1", "top_k_accuracy"]),
    "diabetes": ("load_diabetes", "regression", ["r2", "mae", "mse"]),
}


def load(name: str, seed: int) -> tuple[torch.Tensor, ...]:
    """The data set split 75/25 into train and test (stratified for classes), as float32."""
    import sklearn.datasets
    from sklearn.model_selection import train_test_split

    loader, kind, _ = TASKS[name]
    X, y = getattr(sklearn.datasets, loader)(return_X_y=True)
    parts = train_test_split(X, y, test_size=0.25, random_state=seed, stratify=None if kind == "regression" else y)
    X_train, X_test, y_train, y_test = (torch.as_tensor(p, dtype=torch.float32) for p in parts)
    if kind == "regression":  # targets of about unit size, as MSE trains best
        mean, std = y_train.mean(), y_train.std()
        y_train, y_test = (y_train - mean) / std, (y_test - mean) / std
    return X_train, X_test, y_train, y_test


def make_model(X: torch.Tensor, outputs: int, gen: torch.Generator) -> gd.Sequential:
    """Standardize (the training set's statistics, kept in the model), then two ReLU layers."""
    features = X.shape[1]
    return gd.Sequential(gd.Standardize().adapt(X), gd.Linear(features, 64, generator=gen), gd.ReLU(),
                         gd.Linear(64, 32, generator=gen), gd.ReLU(), gd.Linear(32, outputs, generator=gen))


def train(args: object, X: torch.Tensor, y: torch.Tensor, kind: str) -> tuple[gd.Sequential, gd.History, float]:
    gen = torch.Generator().manual_seed(args.seed)
    outputs = {"binary": 1, "classes": int(y.max()) + 1, "regression": 1}[kind]
    model = make_model(X, outputs, gen)
    loss = {"binary": gd.BCEWithLogits(), "classes": gd.CrossEntropy(), "regression": gd.MSE()}[kind]
    targets = y.long() if kind == "classes" else y.reshape(-1, 1)
    os.makedirs(args.out, exist_ok=True)
    callbacks = [gd.EarlyStopping(monitor="val_loss", patience=args.patience, restore_best_weights=True),
                 gd.ModelCheckpoint(os.path.join(args.out, "tabular_best.gdl"), monitor="val_loss",
                                    save_best_only=True)]
    # validation_split holds out the last rows: train_test_split has shuffled them already
    started = time.perf_counter()
    history = model.fit(X, targets, loss=loss, optimizer=gd.Adam(lr=args.lr, weight_decay=1e-4), epochs=args.epochs,
                        batch_size=args.batch_size, validation_split=0.2, callbacks=callbacks, seed=args.seed,
                        verbose=False)
    return model, history, time.perf_counter() - started


def sklearn_scores(X_train: torch.Tensor, y_train: torch.Tensor, X_test: torch.Tensor, y_test: torch.Tensor,
                   kind: str, metrics: list[str], seed: int) -> tuple[dict[str, float], float]:
    """scikit-learn's MLP (same widths, Adam, early stopping on a 20 % split) on the same data."""
    from sklearn import metrics as skm
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    net = (MLPRegressor if kind == "regression" else MLPClassifier)(
        hidden_layer_sizes=(64, 32), early_stopping=True, validation_fraction=0.2, max_iter=500, random_state=seed)
    model = make_pipeline(StandardScaler(), net)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X_train.numpy(), y_train.numpy())
    seconds = time.perf_counter() - started
    truth, guess = y_test.numpy(), model.predict(X_test.numpy())
    if kind == "regression":
        table = {"r2": skm.r2_score, "mae": skm.mean_absolute_error, "mse": skm.mean_squared_error}
        return {m: float(table[m](truth, guess)) for m in metrics}, seconds
    scores = {"accuracy": skm.accuracy_score(truth, guess)}
    average = "binary" if kind == "binary" else "macro"
    for m, fn in (("precision", skm.precision_score), ("recall", skm.recall_score), ("f1", skm.f1_score)):
        scores[m] = fn(truth, guess, average=average, zero_division=0)
    proba = model.predict_proba(X_test.numpy())
    if "auc" in metrics:
        scores["auc"] = skm.roc_auc_score(truth, proba[:, 1])
    if "top_k_accuracy" in metrics:
        scores["top_k_accuracy"] = skm.top_k_accuracy_score(truth, proba, k=2)
    return {m: float(scores[m]) for m in metrics}, seconds


def main(argv: list[str] | None = None) -> int:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=sorted(TASKS), default="breast_cancer", help="the scikit-learn data set")
    parser.add_argument("--seed", type=number(int, 0), default=0, help="seeds the split, weights and shuffling")
    parser.add_argument("--epochs", type=number(int, 1), default=300, help="at most this many epochs")
    parser.add_argument("--patience", type=number(int, 0), default=15,
                        help="epochs without a better val_loss before stopping")
    parser.add_argument("--batch-size", type=number(int, 1), default=32, help="examples per step")
    parser.add_argument("--lr", type=number(float, 0, low_open=True), default=1e-3, help="Adam's learning rate")
    parser.add_argument("--out", default="out", help="folder for the best epoch's model file")
    args = parser.parse_args(argv)
    try:
        import sklearn  # noqa: F401
    except ImportError:
        print("examples/tabular.py needs scikit-learn: pip install -c constraints.txt -e \".[examples]\"",
              file=sys.stderr)
        return 1
    _, kind, metrics = TASKS[args.data]
    X_train, X_test, y_train, y_test = load(args.data, args.seed)
    model, history, seconds = train(args, X_train, y_train, kind)
    stopper_epochs = len(history["loss"])
    best = min(range(stopper_epochs), key=lambda e: history["val_loss"][e])
    test_targets = y_test.long() if kind == "classes" else y_test.reshape(-1, 1)
    ours = model.evaluate(X_test, test_targets, metrics=metrics)
    theirs, their_seconds = sklearn_scores(X_train, y_train, X_test, y_test, kind, metrics, args.seed)
    print(f"{args.data}: {len(X_train)} train rows (20 % of them held out for validation), {len(X_test)} test rows")
    print(f"graphdl: {stopper_epochs} epochs in {seconds:.2f} s (early stopping), best val_loss "
          f"{history['val_loss'][best]:.4f} at epoch {best + 1}, restored; saved to "
          f"{os.path.join(args.out, 'tabular_best.gdl')}")
    print(f"scikit-learn MLP: trained in {their_seconds:.2f} s")
    print(f"{'test metric':<16}{'graphdl':>10}{'sklearn MLP':>14}")
    for m in metrics:
        print(f"{m:<16}{ours[m]:>10.4f}{theirs[m]:>14.4f}")
    reloaded = gd.load(os.path.join(args.out, "tabular_best.gdl"))
    same = torch.equal(reloaded.predict(X_test), model.predict(X_test))
    print(f"the best-epoch checkpoint reproduces the restored model: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
