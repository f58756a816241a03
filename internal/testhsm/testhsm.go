// Package testhsm gives tests a real SoftHSM2 token in a throwaway directory,
// one per test binary (SOFTHSM2_CONF is read once per process).
package testhsm

import (
	"fmt"
	"os"
	"testing"

	"github.com/kmsd-project/kmsd/hsm"
	"github.com/kmsd-project/kmsd/hsm/softhsm"
)

// TokenLabel is the label of the test token.
const TokenLabel = "kmsd-test"

var setup softhsm.Setup

// Main bootstraps the token in a temp dir, runs the tests and removes it.
// Call it from TestMain. m is a *testing.M, or wraps one to run more
// around the tests.
func Main(m interface{ Run() int }) {
	dir, err := os.MkdirTemp("", "kmsd-softhsm-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	setup, err = softhsm.Bootstrap(dir, TokenLabel, true)
	if err != nil {
		fmt.Fprintln(os.Stderr, "testhsm:", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// Setup returns the bootstrapped token's settings.
func Setup() softhsm.Setup { return setup }

// PIN returns the token's user PIN.
func PIN(t testing.TB) string {
	pin, err := softhsm.ReadPIN(setup.PINFile)
	if err != nil {
		t.Fatal(err)
	}
	return pin
}

// Config returns an hsm.Config for the test token.
func Config(t testing.TB) hsm.Config {
	return hsm.Config{Module: setup.Module, TokenLabel: TokenLabel, PIN: PIN(t), CreateKEK: true}
}

// Open opens a sealer on the test token and closes it when the test ends.
func Open(t testing.TB) *hsm.Sealer {
	t.Helper()
	s, err := hsm.Open(Config(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}
