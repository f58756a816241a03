package main

import (
	"flag"
	"fmt"
	"strings"
	"time"

	"github.com/kmsd-project/kmsd/api/client"
)

var kekCommands = []command{
	{
		name: "kek status", synopsis: "[--count]",
		help:  "show the KEKs (the primary that seals, the others that still open) and the last rotation (an admin token over \"*\"); --count reads every version to count the secrets under each KEK",
		flags: func(fs *flag.FlagSet) { fs.Bool("count", false, "count the secrets sealed under each KEK") },
		run: func(e *env, fs *flag.FlagSet, _ []string) (int, error) {
			st, err := e.c.KEKStatus(e.ctx, boolFlag(fs, "count"))
			if err != nil {
				return 0, err
			}
			return exitOK, e.out(st)
		},
	},
	{
		name: "kek rotate", synopsis: "[--wait]",
		help:  "make a new KEK in the HSM and seal every secret again under it, in the background (an admin token over \"*\"); --wait follows it with a progress bar on stderr until it is done (within --timeout)",
		flags: func(fs *flag.FlagSet) { fs.Bool("wait", false, "wait until every secret is sealed under the new KEK") },
		run: func(e *env, fs *flag.FlagSet, _ []string) (int, error) {
			st, err := e.c.RotateKEK(e.ctx)
			if err != nil {
				return 0, err
			}
			if boolFlag(fs, "wait") {
				if st, err = waitKEK(e); err != nil {
					return exitFailure, err
				}
			}
			return exitOK, e.out(st)
		},
	},
	{
		name: "kek retire", synopsis: "ID", nargs: 1,
		help: "destroy an old KEK in the HSM once nothing is sealed under it (refused otherwise; an admin token over \"*\"): backups sealed under it no longer restore",
		run: func(e *env, _ *flag.FlagSet, args []string) (int, error) {
			st, err := e.c.RetireKEK(e.ctx, args[0])
			if err != nil {
				return 0, err
			}
			return exitOK, e.out(st)
		},
	},
}

func init() { commands = append(commands, kekCommands...) }

// waitKEK follows a rotation until it is done, drawing its progress.
func waitKEK(e *env) (*client.KEKStatus, error) {
	for {
		st, err := e.c.KEKStatus(e.ctx, false)
		if err != nil {
			return nil, err
		}
		r := st.Rotation
		if r == nil {
			return st, nil
		}
		fmt.Fprintf(e.stderr, "\rKEK rotation to %.8s: %s, %d keys, %d versions, %d sealed again", r.To, r.State, r.Keys, r.Versions, r.Rewrapped)
		if r.State == "done" {
			fmt.Fprintln(e.stderr)
			return st, nil
		}
		if r.Error != "" && !strings.Contains(r.Error, "context canceled") {
			fmt.Fprintf(e.stderr, " (retrying: %s)", r.Error)
		}
		select {
		case <-e.ctx.Done():
			fmt.Fprintln(e.stderr)
			return nil, fmt.Errorf("the rotation goes on in kmsd; kmsctl stopped waiting: %w", e.ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}
