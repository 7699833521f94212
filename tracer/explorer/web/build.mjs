// Builds the explorer's page into dist/: one bundled script (esbuild), the HTML and the CSS.
// Run by scripts/setup (npm ci && npm run build); the Python server serves dist/.
import { build } from "esbuild";
import { copyFileSync, mkdirSync, rmSync } from "node:fs";

rmSync("dist", { recursive: true, force: true });
mkdirSync("dist/assets", { recursive: true });
await build({
  entryPoints: ["src/main.js"],
  bundle: true,
  minify: true,
  sourcemap: false,
  format: "iife",
  target: ["chrome100", "firefox100", "safari15"],
  outfile: "dist/assets/app.js",
  logLevel: "warning",
});
copyFileSync("src/index.html", "dist/index.html");
copyFileSync("src/style.css", "dist/assets/style.css");
console.log("explorer page built in dist/");
