//go:build race

package main

// raceEnabled: the race detector slows the JSON work the cost tests time
// about tenfold.
const raceEnabled = true
