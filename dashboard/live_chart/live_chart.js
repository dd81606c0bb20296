// samlab's live chart: one plotly figure that the page redraws in place.
//
// Each time the panel refreshes, Streamlit sends this frame the whole figure again (a render message);
// Plotly.react diffs it against what is drawn and redraws only what changed, in this frame's own small
// document. The zoom, pan and legend choices of the reader survive the refreshes (layout.uirevision).
// window.liveChart counts renders and full rebuilds (the page's tests read it).
(function () {
  "use strict";
  const chart = document.getElementById("chart");
  window.liveChart = { renders: 0, rebuilds: 0 };
  let height = null;

  function send(type, data) {
    window.parent.postMessage(Object.assign({ isStreamlitMessage: true, type: type }, data), "*");
  }

  // The Streamlit theme's colours on a figure built without a template of its own.
  function themed(layout, theme) {
    if (!theme) return layout;
    const grid = theme.base === "dark" ? "rgba(250, 250, 250, 0.12)" : "rgba(49, 51, 63, 0.12)";
    const out = Object.assign({}, layout, {
      paper_bgcolor: theme.backgroundColor,
      plot_bgcolor: theme.backgroundColor,
      font: Object.assign({ family: theme.font }, layout.font || {}, { color: theme.textColor }),
    });
    for (const name of Object.keys(out)) {
      if (/^[xy]axis\d*$/.test(name)) {
        // "allow": no measuring of every tick label to hide the ones past the frame's edge at each redraw
        out[name] = Object.assign({ gridcolor: grid, zerolinecolor: grid, linecolor: grid, ticklabeloverflow: "allow" },
                                  out[name]);
      }
    }
    if (out.annotations) {  // subplot titles
      out.annotations = out.annotations.map((a) => Object.assign({}, a, { font: Object.assign({}, a.font || {}, { color: theme.textColor }) }));
    }
    return out;
  }

  function render(args, theme) {
    const figure = JSON.parse(args.spec);
    const layout = themed(Object.assign({}, figure.layout, { autosize: true, uirevision: args.revision }), theme);
    delete layout.width;
    const before = chart.querySelector(".main-svg");
    Plotly.react(chart, figure.data, layout, args.config || {}).then(function () {
      window.liveChart.renders += 1;
      if (before !== null && chart.querySelector(".main-svg") !== before) window.liveChart.rebuilds += 1;
      if (chart.offsetHeight !== height) {
        height = chart.offsetHeight;
        send("streamlit:setFrameHeight", { height: height });
      }
    });
  }

  window.addEventListener("message", function (event) {
    if (event.data && event.data.type === "streamlit:render") render(event.data.args, event.data.theme);
  });
  send("streamlit:componentReady", { apiVersion: 1 });
})();
