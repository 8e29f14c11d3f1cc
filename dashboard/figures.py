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
