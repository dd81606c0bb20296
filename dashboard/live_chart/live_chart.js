// samlab's live chart: one plotly figure that is redrawn in place, and a watched run's progress.
//
// The page sends this frame a figure (a render message); Plotly.react diffs it against what is drawn and
// redraws only what changed, in this frame's own small document. The zoom, pan and legend choices of the
// reader survive the redraws (layout.uirevision).
//
// A watched run's card sends a feed instead: the URL of a file that the server rewrites while the run
// goes on (progress, figure, status; see dashboard/live.py). The frame fetches it by itself, as often as
// the feed says, and redraws when its version grows; no script runs for it. When the feed ends (with
// args.rerun_at_end), when its active runs are no longer the page's (args.active), or when the run
// published a new stage of its result, the frame sets the component's value, which runs the page again
// (once per change and page run). The feed of the active runs has nothing to draw. window.liveChart
// counts renders, full rebuilds, fetches and the page's messages, and says how plotly.js' load went (the
// page's tests read it).
(function () {
  "use strict";
  const chart = document.getElementById("chart");
  const progress = document.getElementById("progress");
  window.liveChart = { renders: 0, rebuilds: 0, fetches: 0, messages: 0, plotly: "none" };
  let height = null;
  let theme = null;
  let args = {};
  let source = null; // the feed URL of the page's last render (null: a plain figure)
  let version = -1; // the feed version drawn
  let asked = null; // the last change the page was asked to run for
  let timer = null;
  let renderedAt = 0; // when the page last ran (sent its arguments)
  let drawnSpec = null; // the figure drawn last (a feed whose progress alone changed keeps it)

  function send(type, data) {
    window.parent.postMessage(Object.assign({ isStreamlitMessage: true, type: type }, data), "*");
  }

  // The Streamlit theme's colours on a figure built without a template of its own.
  function themed(layout) {
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

  function resize() {
    const now = document.body.offsetHeight;
    if (now !== height) {
      height = now;
      send("streamlit:setFrameHeight", { height: height });
    }
  }

  // A progress bar like Streamlit's: the label above a thin bar in the theme's primary colour.
  function showProgress(value) {
    progress.style.display = value ? "block" : "none";
    if (!value) return;
    progress.querySelector(".text").textContent = value.text;
    const bar = progress.querySelector(".bar");
    bar.style.width = (100 * Math.min(Math.max(value.fraction, 0), 1)).toFixed(1) + "%";
    if (theme) {
      progress.style.color = theme.textColor;
      progress.style.fontFamily = theme.font;
      bar.style.background = theme.primaryColor;
      progress.querySelector(".track").style.background = theme.secondaryBackgroundColor;
    }
  }

  // plotly.js is loaded when the frame first has a figure to draw (a frame that only shows a progress
  // line never evaluates it).
  let plotlyWaiting = null;
  function withPlotly(then) {
    if (window.Plotly) return then();
    if (plotlyWaiting === null) {
      plotlyWaiting = [];
      loadPlotly(0);
    }
    plotlyWaiting.push(then);
  }

  // A load that fails (a busy server) is tried again, 1, 2, 4 … up to 16 s later.
  function loadPlotly(failures) {
    const script = document.createElement("script");
    script.src = "plotly.min.js";
    script.onload = function () {
      window.liveChart.plotly = "loaded";
      plotlyWaiting.forEach((f) => f());
    };
    script.onerror = function () {
      window.liveChart.plotly = "failed " + (failures + 1);
      script.remove();
      setTimeout(() => loadPlotly(failures + 1), 1000 * Math.min(2 ** failures, 16));
    };
    window.liveChart.plotly = "loading";
    document.head.appendChild(script);
  }

  function draw(content) {
    showProgress(content.progress);
    if (!content.spec || content.spec === drawnSpec) {
      resize();
      return;
    }
    withPlotly(() => plot(content));
  }

  function plot(content) {
    const figure = JSON.parse(content.spec);
    const layout = themed(Object.assign({}, figure.layout, { autosize: true, uirevision: args.revision }));
    delete layout.width;
    const before = chart.querySelector(".main-svg");
    Plotly.react(chart, figure.data, layout, args.config || {}).then(function () {
      drawnSpec = content.spec; // only a figure that was drawn is skipped next time
      window.liveChart.renders += 1;
      if (before !== null && chart.querySelector(".main-svg") !== before) window.liveChart.rebuilds += 1;
      resize();
    }, function (error) {
      window.liveChart.error = String(error);
    });
  }

  // What the page drew no longer holds: ask it to run again, once per change. A newly published stage of
  // the run's result waits until the page's last run is args.stage_every_s old (the next fetch looks again).
  function checkPage(feed) {
    let change = null;
    const stage = JSON.stringify(feed.stage);
    if (args.rerun_at_end && feed.final) change = "end " + feed.version;
    else if (args.active && feed.active.join(",") !== args.active.join(",")) change = "active " + feed.active.join(",");
    else if (args.stage !== undefined && stage !== JSON.stringify(args.stage) &&
             Date.now() - renderedAt >= 1000 * (args.stage_every_s || 0)) change = "stage " + stage;
    if (change !== null && change !== asked) {
      asked = change;
      send("streamlit:setComponentValue", { value: change, dataType: "json" });
    }
  }

  function poll() {
    const url = source;
    timer = null;
    window.liveChart.fetches += 1;
    fetch(url + "?n=" + window.liveChart.fetches, { cache: "no-store" })
      .then((response) => (response.ok ? response.json() : null))
      .catch(() => null)
      .then(function (feed) {
        if (url !== source) return; // the page has drawn something else meanwhile
        if (feed) {
          if (feed.version > version) {
            version = feed.version;
            draw(feed);
          }
          checkPage(feed);
          if (feed.final) return;
        }
        timer = setTimeout(poll, 1000 * ((feed && feed.next_s) || 2));
      });
  }

  function render(newArgs, newTheme) {
    if (JSON.stringify(newTheme) !== JSON.stringify(theme)) drawnSpec = null; // the colours change
    args = newArgs;
    theme = newTheme;
    renderedAt = Date.now();
    asked = null; // the page ran: a change is asked for again if it still holds
    const feed = args.feed || null;
    if (feed !== source) {
      clearTimeout(timer);
      timer = null;
      source = feed;
      version = -1;
      if (source !== null) timer = setTimeout(poll, 1000 * (args.next_s || 2));
    }
    if (args.version === undefined || args.version === null || args.version >= version) {
      if (args.version !== undefined && args.version !== null) version = args.version;
      draw(args);
    }
  }

  window.addEventListener("message", function (event) {
    if (event.data && event.data.type === "streamlit:render") {
      window.liveChart.messages += 1;
      render(event.data.args, event.data.theme);
    }
  });
  // Streamlit listens to a frame from its mount's effect on; a frame loaded from the browser's cache can
  // say it is ready before that, and the message is lost: say it again until the first render arrives.
  // (A frame moved in the page is loaded again with a window Streamlit never listens to, which this
  // cannot mend: the pages keep their frames in place.)
  function ready() {
    if (window.liveChart.messages > 0) return;
    send("streamlit:componentReady", { apiVersion: 1 });
    setTimeout(ready, 500);
  }
  ready();
})();
