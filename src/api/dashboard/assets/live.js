// Keeps a build list current: the server sends the rows whenever they change.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const table = document.querySelector("table[data-live]");
  if (!table || !window.EventSource) return;
  const rows = table.querySelector("tbody");
  const status = document.getElementById("live-status");
  const events = new EventSource(table.dataset.live);
  events.addEventListener("rows", (event) => {
    // The server renders and escapes the rows, as for the page itself.
    rows.innerHTML = event.data;
    if (status) status.textContent = "Live: updated " + new Date().toLocaleTimeString();
  });
  events.addEventListener("error", () => {
    if (status) status.textContent = "Reconnecting…";
  });
});
