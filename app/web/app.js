// The activity service's dashboard: plain ES modules, no build step, no third-party code.

import { startAgents } from "./agents.js";
import { askToken } from "./api.js";
import { startContent } from "./content.js";
import { openAudit, routeHash } from "./audit.js";
import { $ } from "./dom.js";
import { dismissIngest, resumeIngest, submitIngest } from "./ingest.js";
import { startLog } from "./log.js";
import { startStats, tickElapsed } from "./stats.js";

function main() {
  $("token-button").addEventListener("click", () => askToken({ force: true }));
  $("ingest-form").addEventListener("submit", submitIngest);
  $("ingest-dismiss").addEventListener("click", dismissIngest);
  $("ingest-audit").addEventListener("click", () => openAudit($("ingest-progress").dataset.ingest));
  $("log-filters").addEventListener("submit", startLog);
  $("audit-form").addEventListener("submit", (event) => {
    event.preventDefault();
    openAudit($("audit-id").value.trim());
  });
  window.addEventListener("hashchange", routeHash);
  setInterval(tickElapsed, 1000);
  startStats();
  startAgents();
  startLog();
  startContent();
  resumeIngest();
  routeHash();
}

main();
