/* Live updates without reloading the page: a running job's stage and progress bar (the page reloads into
   the report once the job has finished), and the job list's status badges. A job page follows the job's
   server-sent events (/api/v1/jobs/ID/events) and falls back to polling the JSON API when they are not
   available; the list polls. Same-origin requests only; it is a static file so the pages'
   Content-Security-Policy can forbid inline script. */
(function () {
  "use strict";
  var FINISHED = ["succeeded", "failed", "cancelled"];
  var WORDS = {queued: "Queued", running: "Running", succeeded: "Succeeded", failed: "Failed", cancelled: "Cancelled"};
  var STAGES = ["preparing", "calibrating", "quantizing", "validating", "reporting"];
  var STATE_WORDS = {done: "done", current: "in progress", todo: "to do"};
  var JOB_POLL_MS = 700;
  var LIST_POLL_MS = 1500;

  function getJSON(url) {
    return fetch(url, {headers: {accept: "application/json"}, cache: "no-store", credentials: "same-origin"})
      .then(function (r) {
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.json();
      });
  }

  function setBadge(el, status) {
    if (!el) { return; }
    el.textContent = WORDS[status] || status;
    el.className = "badge status-" + status;
  }

  function backoff(failures, base) {
    return Math.min(15000, base * Math.pow(2, Math.min(failures, 5)));
  }

  function watchJob(box) {
    var url = "/api/v1/jobs/" + encodeURIComponent(box.getAttribute("data-live-job"));
    var badge = document.querySelector(".jobhead [data-field=status]");
    var stageText = box.querySelector("[data-field=stage-text]");
    var pctText = box.querySelector("[data-field=progress-text]");
    var bar = box.querySelector("[data-field=progress]");
    var failures = 0;

    function show(job) {
      box.setAttribute("data-status", job.status);
      setBadge(badge, job.status);
      stageText.textContent = job.status === "queued" ? (job.waiting_reason || "waiting for a worker") : (job.stage || job.status);
      pctText.textContent = job.progress + " %";
      bar.value = job.progress;
      bar.textContent = job.progress + " %";
      var current = job.status === "succeeded" ? STAGES.length : STAGES.indexOf(job.stage);
      box.querySelectorAll("li[data-stage]").forEach(function (li, i) {
        var state = i < current ? "done" : (i === current ? "current" : "todo");
        li.className = "stage-" + state;
        li.querySelector(".state").textContent = "(" + STATE_WORDS[state] + ")";
      });
    }

    function tick() {
      getJSON(url).then(function (job) {
        failures = 0;
        show(job);
        if (FINISHED.indexOf(job.status) >= 0) {
          window.location.reload();
          return;
        }
        window.setTimeout(tick, JOB_POLL_MS);
      }, function () {
        failures += 1;
        window.setTimeout(tick, backoff(failures, JOB_POLL_MS));
      });
    }

    /* Events first: "job" carries the job as the API returns it, "end" the finished job (then the stream
       closes). On any error the stream is closed and polling takes over. */
    function listen() {
      var source;
      try {
        source = new EventSource(url + "/events");
      } catch (e) {
        window.setTimeout(tick, JOB_POLL_MS);
        return;
      }
      var ended = false;
      source.addEventListener("job", function (e) { show(JSON.parse(e.data)); });
      source.addEventListener("end", function (e) {
        ended = true;
        source.close();
        show(JSON.parse(e.data));
        window.location.reload();
      });
      source.addEventListener("gone", function () {
        ended = true;
        source.close();
        window.location.reload();
      });
      source.onerror = function () {
        source.close();
        if (!ended) { window.setTimeout(tick, JOB_POLL_MS); }
      };
    }

    if (window.EventSource) { listen(); } else { window.setTimeout(tick, JOB_POLL_MS); }
  }

  function watchList(table) {
    var url = table.getAttribute("data-live-list");
    var failures = 0;

    function rowOf(root, id) {
      return root.querySelector('tr[data-job-id="' + CSS.escape(id) + '"]');
    }

    /* A finished row's size and accuracy cells are formatted by the server: take the row from a fresh
       copy of this page (parsed, never executed) instead of re-implementing the formatting here. */
    function refreshRow(id) {
      return fetch(window.location.href, {cache: "no-store", credentials: "same-origin"})
        .then(function (r) { return r.text(); })
        .then(function (html) {
          var fresh = rowOf(new DOMParser().parseFromString(html, "text/html"), id);
          var old = rowOf(table, id);
          if (fresh && old) { old.replaceWith(document.importNode(fresh, true)); }
        });
    }

    function update(job) {
      var row = rowOf(table, job.id);
      if (!row) { return null; }
      var was = row.getAttribute("data-status");
      row.setAttribute("data-status", job.status);
      setBadge(row.querySelector("[data-field=status]"), job.status);
      var stage = row.querySelector("[data-field=stage]");
      if (stage) { stage.textContent = job.status === "running" ? (job.stage || "") + " " + job.progress + " %" : ""; }
      if (was !== job.status && FINISHED.indexOf(job.status) >= 0) { return refreshRow(job.id); }
      return null;
    }

    function tick() {
      if (!table.querySelector("tr[data-status=queued], tr[data-status=running]")) { return; }
      getJSON(url).then(function (page) {
        failures = 0;
        return Promise.all(page.items.map(update));
      }).then(function () {
        window.setTimeout(tick, LIST_POLL_MS);
      }, function () {
        failures += 1;
        window.setTimeout(tick, backoff(failures, LIST_POLL_MS));
      });
    }
    window.setTimeout(tick, LIST_POLL_MS);
  }

  var box = document.querySelector("[data-live-job]");
  if (box) { watchJob(box); }
  var table = document.querySelector("table[data-live-list]");
  if (table) { watchList(table); }
})();
