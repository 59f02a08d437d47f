"""A Dockerfile linter built from BuildKit: the checks `docker build --check` runs, with no
Docker engine (none runs on this machine). The Go source is written into a wrapper
module at build time; `dockerfile-lint FILE...` prints `file:line: Rule: detail (url)`
and exits 1 when any check fails."""

from __future__ import annotations

MAIN_GO = """// dockerfile-lint runs BuildKit's Dockerfile checks on files, without a Docker engine.
package main

import (
\t"context"
\t"fmt"
\t"os"

\t"github.com/moby/buildkit/client/llb"
\t"github.com/moby/buildkit/frontend/dockerfile/dockerfile2llb"
\t"github.com/sirupsen/logrus"
)

func fail(err error) {
\tfmt.Fprintln(os.Stderr, err)
\tos.Exit(2)
}

func main() {
\t// Base images are looked up for some checks; without a registry that is logged, not fatal.
\tlogrus.SetLevel(logrus.WarnLevel)
\tctx := context.Background()
\tfailed := false
\tfor _, path := range os.Args[1:] {
\t\tdt, err := os.ReadFile(path)
\t\tif err != nil {
\t\t\tfail(err)
\t\t}
\t\t// Lint results name their source by an LLB definition; an empty one will do.
\t\tsrc := llb.Scratch()
\t\tdef, err := src.Marshal(ctx)
\t\tif err != nil {
\t\t\tfail(err)
\t\t}
\t\tsourceMap := llb.NewSourceMap(&src, path, "Dockerfile", dt)
\t\tsourceMap.Definition = def
\t\tresults, err := dockerfile2llb.DockerfileLint(ctx, dt, dockerfile2llb.ConvertOpt{SourceMap: sourceMap})
\t\tif err != nil {
\t\t\tfail(fmt.Errorf("%s: %w", path, err))
\t\t}
\t\tfor _, w := range results.Warnings {
\t\t\tline := 0
\t\t\tif len(w.Location.Ranges) > 0 {
\t\t\t\tline = int(w.Location.Ranges[0].Start.Line)
\t\t\t}
\t\t\tfmt.Printf("%s:%d: %s: %s (%s)\\n", path, line, w.RuleName, w.Detail, w.URL)
\t\t\tfailed = true
\t\t}
\t}
\tif failed {
\t\tos.Exit(1)
\t}
}
"""
