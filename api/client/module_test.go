package client_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// TestImportableFromAnotherModule builds a throwaway module outside this
// repository that imports the worker SDK through a replace of this checkout,
// as an MCP server in its own repository would: the module path must be a
// real import path and the SDK must not depend on anything an outside
// module cannot import.
func TestImportableFromAnotherModule(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	modPath := modulePath(t, filepath.Join(root, "go.mod"))
	if !strings.Contains(strings.SplitN(modPath, "/", 2)[0], ".") {
		t.Fatalf("module path %q has no dotted host: go get cannot fetch it", modPath)
	}
	dir := t.TempDir()
	write := func(name, body string) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	goVersion := runtime.Version()[2:]
	write("go.mod", "module example.com/worker\n\ngo "+goVersion+"\n\nrequire "+modPath+" v0.0.0\n\nreplace "+modPath+" => "+root+"\n")
	sum, err := os.ReadFile(filepath.Join(root, "go.sum"))
	if err != nil {
		t.Fatal(err)
	}
	write("go.sum", string(sum))
	write("main.go", `package main

import (
	"context"
	"fmt"
	"os"

	"`+modPath+`/api/client"
	"`+modPath+`/api/client/hekeys"
)

func main() {
	c, err := client.New("https://127.0.0.1:1", "kms_0000000000000000_x")
	if err != nil {
		panic(err)
	}
	f := &hekeys.Fetcher{BaseURL: "https://127.0.0.1:1", CacheDir: os.TempDir()}
	var keys *hekeys.Keys
	_ = keys
	_, err = c.Identity(context.Background())
	fmt.Println(f.BaseURL, err != nil)
}
`)
	for _, args := range [][]string{{"mod", "tidy"}, {"build", "-o", "worker", "."}, {"vet", "."}} {
		cmd := exec.Command(goBin, args...)
		cmd.Dir = dir
		cmd.Env = append(os.Environ(), "GOFLAGS=-mod=mod", "GOTOOLCHAIN=local", "GOWORK=off")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go %s in an outside module: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	out, err := exec.Command(filepath.Join(dir, "worker")).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "https://127.0.0.1:1 true") {
		t.Fatalf("the outside module's program: %v\n%s", err, out)
	}
}

func modulePath(t *testing.T, goMod string) string {
	b, err := os.ReadFile(goMod)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if p, ok := strings.CutPrefix(line, "module "); ok {
			return strings.TrimSpace(p)
		}
	}
	t.Fatal("go.mod names no module")
	return ""
}
