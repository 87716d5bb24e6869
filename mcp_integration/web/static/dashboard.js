// voice-mcp status page: the server renders every row; this script swaps in the rows it pushes over
// server-sent events, keeps relative times fresh, and posts the actions. No framework, no build step.
(() => {
  "use strict";
  const byId = (id) => document.getElementById(id);
  let skew = 0; // server clock minus ours, so "5 s ago" means the server's five seconds

  function setIndicator(id, state, text) {
    const el = byId(id);
    el.dataset.state = state;
    el.textContent = text;
  }

  function applyStatus(raw) {
    const s = JSON.parse(raw);
    if (s.summary) byId("summary").textContent = s.summary;
    setIndicator("monitor", s.monitor ? "on" : "off", s.monitor ? "health monitor running" : "health monitor stopped");
    setIndicator("database", s.database ? "on" : "off", s.database ? "database reachable" : "database unreachable");
  }

  function ago(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    if (s < 60) return `${s} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return `${Math.floor(s / 86400)} d ago`;
  }

  function tick() {
    const now = Date.now() + skew;
    for (const t of document.querySelectorAll("time[data-rel]")) {
      t.textContent = ago((now - Date.parse(t.dateTime)) / 1000);
    }
    for (const t of document.querySelectorAll("time[data-since]")) {
      const s = Math.max(0, (now - Date.parse(t.dateTime)) / 1000);
      t.textContent = `running ${s < 10 ? s.toFixed(2) : Math.round(s)} s`;
    }
  }

  function notice(text, ok) {
    const el = byId("notice");
    el.textContent = text;
    el.className = ok ? "" : "error";
    el.hidden = false;
  }

  applyStatus(document.body.dataset.status);
  skew = Date.parse(document.body.dataset.now) - Date.now();
  tick();
  setInterval(tick, 1000);

  const events = new EventSource("/events");
  events.onopen = () => setIndicator("live", "on", "live");
  events.onerror = () => {
    if (events.readyState === EventSource.CLOSED) setIndicator("live", "off", "disconnected: reload the page");
    else setIndicator("live", "wait", "reconnecting…");
  };
  for (const part of ["servers", "jobs"]) {
    events.addEventListener(part, (e) => {
      byId(`${part}-body`).innerHTML = e.data;
      tick();
    });
  }
  events.addEventListener("status", (e) => applyStatus(e.data));

  document.addEventListener("click", async (e) => {
    const button = e.target.closest("button[data-action]");
    if (!button) return;
    const { action, server } = button.dataset;
    button.disabled = true;
    try {
      const response = await fetch(`/servers/${encodeURIComponent(server)}/${action}`, {
        method: "POST",
        credentials: "same-origin",
      });
      const body = await response.json().catch(() => ({ message: `${response.status} ${response.statusText}` }));
      notice(body.message, response.ok);
    } catch (err) {
      notice(`${action} ${server}: the dashboard did not answer (${err})`, false);
    } finally {
      button.disabled = false;
    }
  });
})();
