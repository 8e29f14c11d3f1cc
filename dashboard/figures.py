"""The Validate page's figures (plotly)."""

from __future__ import annotations


def confusion_figure(report: dict):
    """The answer mode's confusion matrix as a heatmap (rows: true label)."""
    import plotly.graph_objects as go

    names = list(report["labels"].values())
    m = report["modes"][report["answer_mode"]]["confusion"]
    fig = go.Figure(go.Heatmap(z=m, x=names, y=names, colorscale="Blues", text=m, texttemplate="%{text}",
                               showscale=False))
    fig.update_layout(xaxis_title="predicted", yaxis_title="true", yaxis_autorange="reversed", height=320,
                      margin=dict(l=10, r=10, t=30, b=10), title="Confusion matrix")
    return fig


def reliability_figure(report: dict):
    """Accuracy per calibrated-confidence bin against the diagonal a calibrated model follows."""
    import plotly.graph_objects as go

    bins = [b for b in report["reliability"] if b["n"]]
    fig = go.Figure([
        go.Bar(x=[(b["from"] + b["to"]) / 2 for b in bins], y=[b["accuracy"] for b in bins], width=0.09,
               text=[f"n={b['n']}" for b in bins], textposition="outside", name="accuracy"),
        go.Scatter(x=[0.5, 1.0], y=[0.5, 1.0], mode="lines", line=dict(dash="dash"), name="calibrated"),
    ])
    fig.update_layout(xaxis_title="calibrated confidence", yaxis_title="share right", yaxis_range=[0, 1.1],
                      xaxis_range=[0.45, 1.05], height=320, margin=dict(l=10, r=10, t=30, b=10),
                      title="Reliability", showlegend=False)
    return fig


def roc_figure(report: dict, point=None):
    """The finding's ROC curve on the validated images, with the operating point in force (if any)
    and the thresholds of the table marked."""
    import plotly.graph_objects as go

    op = report["operating"]
    roc = op["roc"]
    finding = report["labels"][op["finding"]]
    fig = go.Figure([
        go.Scatter(x=roc["fpr"], y=roc["tpr"], mode="lines", name="ROC", customdata=roc["thresholds"],
                   hovertemplate=f"P({finding}) ≥ %{{customdata:.2f}}: sensitivity %{{y:.2f}}, 1 − specificity %{{x:.2f}}"),
        go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dash"), name="chance"),
    ])
    rows = [r for r in op["table"] if r["sensitivity"] is not None and r["specificity"] is not None]
    fig.add_trace(go.Scatter(x=[1 - r["specificity"] for r in rows], y=[r["sensitivity"] for r in rows], mode="markers",
                             name="table thresholds", text=[f"{r['threshold']:.2f}" for r in rows],
                             hovertemplate="threshold %{text}"))
    if point is not None and point.figures.get("sensitivity") is not None:
        fig.add_trace(go.Scatter(x=[1 - point.figures["specificity"]], y=[point.figures["sensitivity"]], mode="markers",
                                 marker=dict(size=14, symbol="star"), name="operating point"))
    fig.update_layout(xaxis_title="1 − specificity", yaxis_title=f"sensitivity ({finding})", height=340,
                      margin=dict(l=10, r=10, t=30, b=10), title=f"ROC of {finding} (AUC {op['auc']:.3f})",
                      showlegend=False)
    return fig
