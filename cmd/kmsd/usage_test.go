package main

import (
	"flag"
	"os/exec"
	"strings"
	"testing"
)

// TestHelpGroupsEveryFlag: kmsd --help says what kmsd is and lists every
// flag once, under a group, with its variable; a flag added without a
// group fails here.
func TestHelpGroupsEveryFlag(t *testing.T) {
	var c config
	fs, _ := newFlagSetErrs(&c, func(string) string { return "" })
	seen := map[string]int{}
	for _, g := range flagGroups {
		for _, f := range g.flags {
			seen[f]++
		}
	}
	fs.VisitAll(func(f *flag.Flag) {
		if seen[f.Name] != 1 {
			t.Errorf("--%s is in %d groups of kmsd --help, want 1", f.Name, seen[f.Name])
		}
		delete(seen, f.Name)
	})
	for f := range seen {
		t.Errorf("kmsd --help groups --%s, which is not a flag", f)
	}

	out, err := exec.Command(kmsdBin, "--help").Output()
	if err != nil {
		t.Fatalf("kmsd --help: %v", err)
	}
	help := string(out)
	if !strings.HasPrefix(help, "kmsd: key management service") || strings.Contains(help, "Usage of kmsd") {
		t.Fatalf("kmsd --help does not start by saying what kmsd is:\n%.300s", help)
	}
	fs.VisitAll(func(f *flag.Flag) {
		if !strings.Contains(help, "\n  --"+f.Name+" ") && !strings.Contains(help, "\n  --"+f.Name+"\n") {
			t.Errorf("kmsd --help does not list --%s", f.Name)
		}
	})
	for _, g := range flagGroups {
		if !strings.Contains(help, "\n"+g.title+":\n") {
			t.Errorf("kmsd --help has no group %q", g.title)
		}
	}
	// A mistyped flag: one line naming it and where the flags are, exit 1.
	cmd := exec.Command(kmsdBin, "--adr", "127.0.0.1:1")
	b, err := cmd.CombinedOutput()
	if err == nil || strings.Count(string(b), "\n") != 1 || !strings.Contains(string(b), "-adr") || !strings.Contains(string(b), "kmsd --help") {
		t.Fatalf("kmsd --adr: %v\n%s", err, b)
	}
}
