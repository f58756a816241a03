package main

import (
	"flag"
	"os"
	"regexp"
	"strings"
	"testing"
)

// TestREADMEListsEveryFlag: the configuration table in README.md names every
// kmsd flag with its environment variable, and no flag kmsd lacks.
func TestREADMEListsEveryFlag(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	var c config
	fs := newFlagSet(&c, func(string) string { return "" })
	row := regexp.MustCompile("(?m)^\\| `--([a-z0-9-]+)` \\| `(KMS_[A-Z0-9_]+)` \\|")
	inREADME := map[string]string{}
	for _, m := range row.FindAllStringSubmatch(string(readme), -1) {
		inREADME[m[1]] = m[2]
	}
	fs.VisitAll(func(f *flag.Flag) {
		env, ok := inREADME[f.Name]
		if !ok {
			t.Errorf("README.md's configuration table lacks --%s", f.Name)
			return
		}
		if !strings.Contains(f.Usage, "env "+env) {
			t.Errorf("--%s: README says %s, the flag's help says %q", f.Name, env, f.Usage)
		}
		delete(inREADME, f.Name)
	})
	for name := range inREADME {
		t.Errorf("README.md lists --%s, which kmsd does not have", name)
	}
}
