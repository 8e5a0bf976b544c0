// The dashboard's only script: a live run's log lines (server-sent events) and the workers page's refresh.
"use strict";

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text; // text, never HTML: log lines are what users' code printed
  return td;
}

function followLogs(table) {
  // The page shows the lines printed before it loaded; the events start from the first line.
  let skip = Number(table.dataset.skip || 0);
  const events = new EventSource(table.dataset.live);
  events.addEventListener("line", (event) => {
    if (skip > 0) {
      skip -= 1;
      return;
    }
    const line = JSON.parse(event.data);
    const row = document.createElement("tr");
    row.className = "log " + (line.source || "");
    row.append(cell(line.timestamp || ""), cell(line.source || ""), cell(line.message || ""));
    row.lastChild.className = "message";
    table.append(row);
  });
  events.addEventListener("end", (event) => {
    events.close();
    const outcome = document.getElementById("outcome");
    if (outcome) outcome.textContent = event.data;
    const live = document.getElementById("live");
    if (live) live.textContent = "The run ended: " + event.data + ".";
  });
  events.addEventListener("lagged", (event) => {
    const row = document.createElement("tr");
    row.className = "log server";
    row.append(cell(""), cell("server"), cell("... " + event.data + " lines not shown: reload the page once the run ends"));
    table.append(row);
  });
  events.onerror = () => events.close();
}

document.addEventListener("DOMContentLoaded", () => {
  const logs = document.getElementById("logs");
  if (logs && logs.dataset.live) followLogs(logs);
  const refresh = document.querySelector("meta[name=refresh-every]");
  if (refresh) setTimeout(() => location.reload(), Number(refresh.content) * 1000);
});
