package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/internal/buildinfo"
)

// commands is the one table that both dispatch and --help read.
var commands = []command{
	{
		name: "version", synopsis: "", help: "print kmsctl's version, the commit it was built from and its Go version (no server is asked)",
		run: func(e *env, _ *flag.FlagSet, _ []string) (int, error) {
			_, err := fmt.Fprintln(e.stdout, buildinfo.String("kmsctl"))
			return exitOK, err
		},
	},
	{
		name: "identity", synopsis: "", help: "print the service's ML-DSA-65 identity public key",
		run: func(e *env, _ *flag.FlagSet, _ []string) (int, error) {
			id, err := e.c.Identity(e.ctx)
			if err != nil {
				return 0, err
			}
			return exitOK, e.out(id)
		},
	},
	{
		name: "keys create", synopsis: "NAME --kind KIND [--destroy-wait-days N] [--allow OPS] [--rotation-period D] [--params P] [--rotations R] [--conjugation] [--relinearization] [--decrypt-log-precision B] [--decrypt-budget N]",
		help: "create a key (kinds: ml-kem-512|768|1024, ml-dsa-44|65|87, ckks, bgv)", nargs: 1,
		flags: func(fs *flag.FlagSet) {
			fs.String("kind", "", "key kind (required)")
			fs.Int("destroy-wait-days", 0, "default waiting period of schedule-destroy, 1-365 (server default 30)")
			fs.String("allow", "", "comma-separated operations the key may do (sign, verify, decapsulate, decrypt); default all of its kind's")
			fs.String("rotation-period", "", "rotate the key on schedule once its latest version is this old, e.g. 720h (at least the server's --min-rotation-period, default 1h); keys show prints next_rotation_time")
			heFlags(fs)
		},
		run: func(e *env, fs *flag.FlagSet, args []string) (int, error) {
			kind := fs.Lookup("kind").Value.String()
			if kind == "" {
				return 0, usageError{"--kind is required"}
			}
			req := client.CreateKeyRequest{Name: args[0], Kind: kind}
			p, err := policyFlags(fs)
			if err != nil {
				return 0, err
			}
			req.Policy = p
			k, op, err := e.c.CreateKeyOrOperation(e.ctx, req)
			if err != nil {
				return 0, err
			}
			if op != nil {
				if err := waitWithBar(e, op); err != nil {
					return exitFailure, err
				}
				if k, err = e.c.GetKey(e.ctx, req.Name); err != nil {
					return 0, err
				}
			}
			return exitOK, e.out(k)
		},
	},
	{
		name: "keys list", synopsis: "[--limit N]", help: "list the keys the token may read (all pages)",
		flags: func(fs *flag.FlagSet) { fs.Int("limit", 100, "keys per request") },
		run: func(e *env, fs *flag.FlagSet, _ []string) (int, error) {
			limit := intFlag(fs, "limit")
			var all []client.Key
			tok := ""
			for {
				page, err := e.c.ListKeys(e.ctx, limit, tok)
				if err != nil {
					return 0, err
				}
				all = append(all, page.Keys...)
				if tok = page.NextPageToken; tok == "" {
					break
				}
			}
			if all == nil {
				all = []client.Key{}
			}
			return exitOK, e.out(all)
		},
	},
	{
		name: "keys show", synopsis: "NAME [--versions N]", help: "show a key and its newest versions (all of them: keys versions)", nargs: 1,
		flags: func(fs *flag.FlagSet) { fs.Int("versions", 100, "newest versions to show, 1-1000") },
		run: func(e *env, fs *flag.FlagSet, args []string) (int, error) {
			k, err := e.c.GetKeyVersions(e.ctx, args[0], intFlag(fs, "versions"))
			if err != nil {
				return 0, err
			}
			return exitOK, e.out(k)
		},
	},
	{
		name: "keys versions", synopsis: "NAME [--limit N]", help: "list all versions of a key, newest first (all pages)", nargs: 1,
		flags: func(fs *flag.FlagSet) { fs.Int("limit", 1000, "versions per request, 1-1000") },
		run: func(e *env, fs *flag.FlagSet, args []string) (int, error) {
			all := []client.Version{}
			tok := ""
			for {
				page, err := e.c.ListVersions(e.ctx, args[0], intFlag(fs, "limit"), tok)
				if err != nil {
					return 0, err
				}
				all = append(all, page.Versions...)
				if tok = page.NextPageToken; tok == "" {
					break
				}
			}
			return exitOK, e.out(all)
		},
	},
	{
		name: "keys rotate", synopsis: "NAME", help: "make a new primary version", nargs: 1,
		run: func(e *env, _ *flag.FlagSet, args []string) (int, error) {
			v, op, err := e.c.RotateOrOperation(e.ctx, args[0])
			if err != nil {
				return 0, err
			}
			if op != nil {
				if err := waitWithBar(e, op); err != nil {
					return exitFailure, err
				}
				k, err := e.c.GetKeyVersions(e.ctx, args[0], 1)
				if err != nil {
					return 0, err
				}
				return exitOK, e.out(k.Versions[0])
			}
			return exitOK, e.out(v)
		},
	},
	{
		name: "keys update", synopsis: "NAME [--min-decryption-version N] [--destroy-wait-days N] [--allow OPS] [--rotation-period D] [--params P] [--rotations R] [--conjugation] [--relinearization] [--decrypt-log-precision B] [--decrypt-budget N]",
		help: "change min_decryption_version or policy fields: only the flags given change, a flag given as 0, false or empty resets its field to the default; HE changes apply to later versions", nargs: 1,
		flags: func(fs *flag.FlagSet) {
			fs.Uint64("min-decryption-version", 0, "oldest version that may still be used")
			fs.Int("destroy-wait-days", 0, "default waiting period of schedule-destroy, 1-365")
			fs.String("allow", "", "comma-separated operations the key may do")
			fs.String("rotation-period", "", "rotate on schedule once the latest version is this old, e.g. 720h; empty turns scheduled rotation off")
			heFlags(fs)
		},
		run: func(e *env, fs *flag.FlagSet, args []string) (int, error) {
			var req client.UpdateKeyRequest
			if isSet(fs, "min-decryption-version") {
				v, _ := fs.Lookup("min-decryption-version").Value.(flag.Getter).Get().(uint64)
				req.MinDecryptionVersion = &v
			}
			p, err := policyFlags(fs)
			if err != nil {
				return 0, err
			}
			req.Policy = p
			req.ClearPolicy = clearedPolicyFields(fs)
			if req.Policy == nil && req.MinDecryptionVersion == nil {
				return 0, usageError{"nothing to change: give --min-decryption-version or a policy flag (kmsctl keys update --help)"}
			}
			k, err := e.c.UpdateKey(e.ctx, args[0], req)
			if err != nil {
				return 0, err
			}
			return exitOK, e.out(k)
		},
	},
	versionCommand("disable", "disable a version that is not primary"),
	versionCommand("enable", "enable a disabled version"),
	versionCommand("schedule-destroy", "erase a version's material after --days (default: the key's policy)"),
	versionCommand("cancel-destroy", "cancel a scheduled destroy; the version comes back disabled"),
	{
		name: "public-key", synopsis: "NAME [--version N|primary] [--out FILE]",
		help: "print a version's public key; with --out write only its raw bytes to FILE (for ckks/bgv: the public-key blob, checked against its digest)", nargs: 1,
		flags: func(fs *flag.FlagSet) {
			fs.String("version", "primary", "version number or primary")
			fs.String("out", "", "write the raw public key to this file instead of printing")
		},
		run: func(e *env, fs *flag.FlagSet, args []string) (int, error) {
			v, err := parseVersion(fs.Lookup("version").Value.String(), true)
			if err != nil {
				return 0, err
			}
			pk, err := e.c.PublicKey(e.ctx, args[0], v)
			if err != nil {
				return 0, err
			}
			out := str(fs, "out")
			if out == "" {
				return exitOK, e.out(pk)
			}
			if pk.Digest == "" {
				return exitOK, writeFileAtomic(out, pk.PublicKey, 0o644)
			}
			return exitOK, writeFileWith(out, 0o644, func(w io.Writer) error { return e.c.PublicKeyBlob(e.ctx, pk, w) })
		},
	},
	{
		name: "sign", synopsis: "NAME (--message B64 | --message-file FILE) [--context B64]", help: "sign with the primary version", nargs: 1,
		flags: func(fs *flag.FlagSet) {
			fs.String("message", "", "message, standard base64")
			fs.String("message-file", "", "file holding the raw message (- for stdin)")
			fs.String("context", "", "FIPS 204 context string, standard base64")
		},
		run: func(e *env, fs *flag.FlagSet, args []string) (int, error) {
			msg, err := binaryInput(str(fs, "message"), str(fs, "message-file"), "message")
			if err != nil {
				return 0, err
			}
			if msg == nil && str(fs, "message-file") == "" {
				return 0, usageError{"give --message or --message-file"}
			}
			if msg == nil {
				msg = []byte{}
			}
			sctx, err := binaryInput(str(fs, "context"), "", "context")
			if err != nil {
				return 0, err
			}
			r, err := e.c.Sign(e.ctx, args[0], msg, sctx)
			if err != nil {
				return 0, err
			}
			return exitOK, e.out(r)
		},
	},
	{
		name: "verify", synopsis: "NAME --version N (--signature B64 | --signature-file FILE) (--message B64 | --message-file FILE) [--context B64]",
		help: "check a signature; exit 0 if valid, 1 if not", nargs: 1,
		flags: func(fs *flag.FlagSet) {
			fs.String("version", "", "version that made the signature (required)")
			fs.String("signature", "", "signature, standard base64")
			fs.String("signature-file", "", "file holding the raw signature")
			fs.String("message", "", "message, standard base64")
			fs.String("message-file", "", "file holding the raw message (- for stdin)")
			fs.String("context", "", "FIPS 204 context string, standard base64")
		},
		run: func(e *env, fs *flag.FlagSet, args []string) (int, error) {
			v, err := parseVersion(str(fs, "version"), false)
			if err != nil {
				return 0, err
			}
			sig, err := binaryInput(str(fs, "signature"), str(fs, "signature-file"), "signature")
			if err != nil {
				return 0, err
			}
			msg, err := binaryInput(str(fs, "message"), str(fs, "message-file"), "message")
			if err != nil {
				return 0, err
			}
			sctx, err := binaryInput(str(fs, "context"), "", "context")
			if err != nil {
				return 0, err
			}
			if sig == nil || (msg == nil && str(fs, "message-file") == "") {
				return 0, usageError{"give --signature and --message (or their -file forms)"}
			}
			if msg == nil {
				msg = []byte{}
			}
			ok, err := e.c.Verify(e.ctx, args[0], v, msg, sig, sctx)
			if err != nil {
				return 0, err
			}
			if err := e.out(client.VerifyResponse{Valid: ok}); err != nil {
				return 0, err
			}
			if !ok {
				return exitInvalid, nil
			}
			return exitOK, nil
		},
	},
	{
		name: "decapsulate", synopsis: "NAME --version N (--ciphertext B64 | --ciphertext-file FILE)",
		help: "recover an ML-KEM shared secret (printed in base64)", nargs: 1,
		flags: func(fs *flag.FlagSet) {
			fs.String("version", "", "version the ciphertext was made for (required)")
			fs.String("ciphertext", "", "ciphertext, standard base64")
			fs.String("ciphertext-file", "", "file holding the raw ciphertext (- for stdin)")
		},
		run: func(e *env, fs *flag.FlagSet, args []string) (int, error) {
			v, err := parseVersion(str(fs, "version"), false)
			if err != nil {
				return 0, err
			}
			ct, err := binaryInput(str(fs, "ciphertext"), str(fs, "ciphertext-file"), "ciphertext")
			if err != nil {
				return 0, err
			}
			if ct == nil {
				return 0, usageError{"give --ciphertext or --ciphertext-file"}
			}
			r, err := e.c.Decapsulate(e.ctx, args[0], v, ct)
			if err != nil {
				return 0, err
			}
			return exitOK, e.out(r)
		},
	},
	{
		name: "tokens create", synopsis: "--role admin|worker|evaluator|encryptor|auditor|decryptor --keys PATTERNS [--name NAME] [--ttl D] [--max-lifetime D] [--audience URL,...]",
		help: "create a bearer token (printed once); it can hold no more than the token that creates it",
		flags: func(fs *flag.FlagSet) {
			fs.String("role", "", "admin, worker, evaluator, encryptor, auditor or decryptor (required)")
			fs.String("keys", "", "comma-separated key-name patterns, e.g. 'team-a-*' or '*' (required; auditors take '*' only)")
			fs.String("name", "", "a name for the token")
			fs.String("ttl", "", "lifetime, e.g. 90m or 720h (default: the server's --max-token-ttl)")
			fs.String("max-lifetime", "", "make the token renewable (kmsctl tokens renew): each renewal extends it by --ttl, never past creation + this (at most the server's --max-token-ttl)")
			fs.String("audience", "", "bind the token to these resources, comma-separated (an MCP server's canonical URL, https://host/mcp): it works only there, and kmsd's own API refuses it")
		},
		run: func(e *env, fs *flag.FlagSet, _ []string) (int, error) {
			if str(fs, "role") == "" || str(fs, "keys") == "" {
				return 0, usageError{"--role and --keys are required"}
			}
			t, err := e.c.CreateToken(e.ctx, client.CreateTokenRequest{Name: str(fs, "name"), Role: str(fs, "role"), Keys: splitList(str(fs, "keys")), TTL: str(fs, "ttl"), MaxLifetime: str(fs, "max-lifetime"), Audience: splitList(str(fs, "audience"))})
			if err != nil {
				return 0, err
			}
			return exitOK, e.out(t)
		},
	},
	{
		name: "tokens list", synopsis: "[--limit N]", help: "list the tokens this token may manage (metadata only, never a secret; all pages)",
		flags: func(fs *flag.FlagSet) { fs.Int("limit", 100, "tokens per request") },
		run: func(e *env, fs *flag.FlagSet, _ []string) (int, error) {
			all := []client.TokenInfo{}
			page := ""
			for {
				l, err := e.c.ListTokens(e.ctx, intFlag(fs, "limit"), page)
				if err != nil {
					return 0, err
				}
				all = append(all, l.Tokens...)
				if page = l.NextPageToken; page == "" {
					break
				}
			}
			return exitOK, e.out(all)
		},
	},
	{
		name: "tokens show", synopsis: "ID", help: "show a token's metadata (ID: the 16 hex digits after kms_)", nargs: 1,
		run: func(e *env, _ *flag.FlagSet, args []string) (int, error) {
			t, err := e.c.GetToken(e.ctx, args[0])
			if err != nil {
				return 0, err
			}
			return exitOK, e.out(t)
		},
	},
	{
		name: "tokens renew", synopsis: "", help: "extend this token (the one kmsctl uses) by its ttl, up to the maximum lifetime it was made with (--max-lifetime); refused for a token made without one",
		run: func(e *env, _ *flag.FlagSet, _ []string) (int, error) {
			t, err := e.c.RenewToken(e.ctx)
			if err != nil {
				return 0, err
			}
			return exitOK, e.out(t)
		},
	},
	{
		name: "tokens revoke", synopsis: "ID", help: "revoke a token: every later request with it is refused", nargs: 1,
		run: func(e *env, _ *flag.FlagSet, args []string) (int, error) {
			t, err := e.c.RevokeToken(e.ctx, args[0])
			if err != nil {
				return 0, err
			}
			return exitOK, e.out(t)
		},
	},
}

func versionCommand(action, help string) command {
	c := command{
		name: "versions " + action, synopsis: "NAME VERSION", help: help, nargs: 2,
		run: func(e *env, fs *flag.FlagSet, args []string) (int, error) {
			v, err := parseVersion(args[1], false)
			if err != nil {
				return 0, err
			}
			days := 0
			if action == "schedule-destroy" {
				days = intFlag(fs, "days")
			}
			out, err := e.c.VersionAction(e.ctx, args[0], v, action, days)
			if err != nil {
				return 0, err
			}
			return exitOK, e.out(out)
		},
	}
	if action == "schedule-destroy" {
		c.synopsis = "NAME VERSION [--days N]"
		c.flags = func(fs *flag.FlagSet) {
			fs.Int("days", 0, "waiting period, 1-365 (default: the key's destroy_wait_days)")
		}
	}
	return c
}

func str(fs *flag.FlagSet, name string) string { return fs.Lookup(name).Value.String() }

func intFlag(fs *flag.FlagSet, name string) int {
	v, _ := fs.Lookup(name).Value.(flag.Getter).Get().(int)
	return v
}

func isSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) {
		if f.Name == name {
			set = true
		}
	})
	return set
}

// heFlags are the policy flags of the HE kinds.
func heFlags(fs *flag.FlagSet) {
	fs.String("params", "", "ckks/bgv: a preset (ckks-logn13..16, bgv-logn13..16) or @FILE holding a Lattigo parameters literal")
	fs.String("rotations", "", "ckks/bgv: comma-separated slot rotations to make Galois keys for")
	fs.Bool("conjugation", false, "ckks: complex conjugation key; bgv: row rotation key")
	fs.Bool("relinearization", false, "ckks/bgv: make a relinearization key")
	fs.Int("decrypt-log-precision", 0, "ckks: round decryption results to at most this many bits, 1-30 (server default 16; noise flooding may leave fewer)")
	fs.Uint64("decrypt-budget", 0, "ckks/bgv: decryptions per version (0: the default, 4096); ckks noise flooding is sized for it, so a smaller budget leaves more precision; it can be lowered, not raised")
}

// policyFlags builds a policy from the policy flags, or nil if none was
// given.
func policyFlags(fs *flag.FlagSet) (*client.Policy, error) {
	given := false
	for _, n := range []string{"destroy-wait-days", "allow", "rotation-period", "params", "rotations", "conjugation", "relinearization", "decrypt-log-precision", "decrypt-budget"} {
		if fs.Lookup(n) != nil && isSet(fs, n) {
			given = true
		}
	}
	if !given {
		return nil, nil
	}
	p := &client.Policy{DestroyWaitDays: intFlag(fs, "destroy-wait-days"), AllowedOperations: splitList(str(fs, "allow")), RotationPeriod: str(fs, "rotation-period")}
	if fs.Lookup("params") == nil {
		return p, nil
	}
	switch v := str(fs, "params"); {
	case strings.HasPrefix(v, "@"):
		b, err := os.ReadFile(v[1:])
		if err != nil {
			return nil, usageError{err.Error()}
		}
		p.Params = json.RawMessage(b)
	case v != "":
		p.Params, _ = json.Marshal(v)
	}
	for _, r := range splitList(str(fs, "rotations")) {
		n, err := strconv.Atoi(r)
		if err != nil {
			return nil, usageError{fmt.Sprintf("--rotations: %q is not a number", r)}
		}
		p.Rotations = append(p.Rotations, n)
	}
	p.Conjugation = boolFlag(fs, "conjugation")
	p.Relinearization = boolFlag(fs, "relinearization")
	p.DecryptLogPrecision = intFlag(fs, "decrypt-log-precision")
	p.DecryptBudget, _ = fs.Lookup("decrypt-budget").Value.(flag.Getter).Get().(uint64)
	return p, nil
}

// policyFields maps the policy flags to the policy's JSON fields.
var policyFields = map[string]string{
	"destroy-wait-days": "destroy_wait_days", "allow": "allowed_operations", "rotation-period": "rotation_period", "params": "params",
	"rotations": "rotations", "conjugation": "conjugation", "relinearization": "relinearization",
	"decrypt-log-precision": "decrypt_log_precision", "decrypt-budget": "decrypt_budget",
}

// clearedPolicyFields are the policy fields whose flag was given with its
// zero value: the update resets them (JSON merge patch null) rather than
// leaving them out, which would keep them.
func clearedPolicyFields(fs *flag.FlagSet) []string {
	var out []string
	fs.Visit(func(f *flag.Flag) {
		field, ok := policyFields[f.Name]
		if !ok {
			return
		}
		if v := f.Value.String(); v == "" || v == "0" || v == "false" {
			out = append(out, field)
		}
	})
	sort.Strings(out)
	return out
}

func boolFlag(fs *flag.FlagSet, name string) bool {
	v, _ := fs.Lookup(name).Value.(flag.Getter).Get().(bool)
	return v
}

// waitWithBar follows a background operation, drawing a progress bar on
// stderr.
func waitWithBar(e *env, op *client.Operation) error {
	// The wait is not bounded by --timeout: a logN 16 keyset takes minutes.
	_, err := e.c.WaitOperation(context.WithoutCancel(e.ctx), op.ID, 200*time.Millisecond, func(o *client.Operation) {
		const width = 30
		filled := 0
		if o.Progress.Total > 0 {
			filled = width * o.Progress.Done / o.Progress.Total
		}
		fmt.Fprintf(e.stderr, "\r[%s%s] %d/%d keys, %d MiB", strings.Repeat("#", filled), strings.Repeat(" ", width-filled), o.Progress.Done, o.Progress.Total, o.Progress.Bytes>>20)
		if o.State != "running" {
			fmt.Fprintln(e.stderr)
		}
	})
	return err
}
