package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/cloudflare/circl/kem"
	"github.com/cloudflare/circl/kem/mlkem/mlkem1024"
	"github.com/cloudflare/circl/kem/mlkem/mlkem512"
	"github.com/cloudflare/circl/kem/mlkem/mlkem768"
	"github.com/cloudflare/circl/sign/mldsa/mldsa65"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/api/client/hekeys"
	"github.com/kmsd-project/kmsd/internal/fileutil"
)

// moreCommands are what the API has beyond the key basics: background
// operations, the audit log's raw parts, local encapsulation and fetching
// HE evaluation keys.
var moreCommands = []command{
	{
		name: "operations show", synopsis: "ID", help: "show a background operation (an HE keyset being generated): state, progress, result", nargs: 1,
		run: func(e *env, _ *flag.FlagSet, args []string) (int, error) {
			op, err := e.c.GetOperation(e.ctx, args[0])
			if err != nil {
				return 0, err
			}
			return exitOK, e.out(op)
		},
	},
	{
		name: "operations wait", synopsis: "ID", help: "wait for a background operation to end, with a progress bar on stderr; exit 4 if it failed", nargs: 1,
		run: func(e *env, _ *flag.FlagSet, args []string) (int, error) {
			op, err := e.c.GetOperation(e.ctx, args[0])
			if err != nil {
				return 0, err
			}
			if op.State == "running" {
				if err := waitWithBar(e, op); err != nil {
					return 0, err
				}
				if op, err = e.c.GetOperation(e.ctx, args[0]); err != nil {
					return 0, err
				}
			}
			if err := e.out(op); err != nil {
				return 0, err
			}
			if op.State == "failed" {
				return exitFailure, nil
			}
			return exitOK, nil
		},
	},
	{
		name: "audit checkpoint", synopsis: "", help: "print the latest signed checkpoint (a C2SP signed note; check it with audit verify)",
		run: func(e *env, _ *flag.FlagSet, _ []string) (int, error) {
			note, err := e.c.AuditCheckpoint(e.ctx)
			if err != nil {
				return 0, err
			}
			_, err = e.stdout.Write(note)
			return exitOK, err
		},
	},
	{
		name: "audit records", synopsis: "--start N --end M", help: "print records [start, end) as JSON lines, exactly as hashed into the log (-o table: a table of their main fields)",
		flags: func(fs *flag.FlagSet) {
			fs.Uint64("start", 0, "first record index")
			fs.Uint64("end", 0, "index after the last record (required)")
		},
		run: func(e *env, fs *flag.FlagSet, _ []string) (int, error) {
			start, end := uintFlag(fs, "start"), uintFlag(fs, "end")
			if end <= start {
				return 0, usageError{"--end must be greater than --start"}
			}
			recs, err := e.c.AuditRecords(e.ctx, start, end)
			if err != nil {
				return 0, err
			}
			if e.table {
				// A table of the fields one reads first; JSON keeps all.
				tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "INDEX\tTIME\tACTOR\tROLE\tOPERATION\tKEY\tVERSION\tSTATUS\tPROBLEM")
				for _, r := range recs {
					var rec struct {
						Index     uint64 `json:"index"`
						Time      string `json:"time"`
						Actor     string `json:"actor"`
						Role      string `json:"role"`
						Operation string `json:"operation"`
						Key       string `json:"key"`
						Version   uint64 `json:"version"`
						Status    int    `json:"status"`
						Problem   string `json:"problem"`
					}
					if err := json.Unmarshal(r, &rec); err != nil {
						return 0, fmt.Errorf("record: %w", err)
					}
					v := ""
					if rec.Version != 0 {
						v = strconv.FormatUint(rec.Version, 10)
					}
					fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\n", rec.Index, rec.Time, rec.Actor, rec.Role, rec.Operation, rec.Key, v, rec.Status, rec.Problem)
				}
				return exitOK, tw.Flush()
			}
			for _, r := range recs {
				if _, err := fmt.Fprintf(e.stdout, "%s\n", r); err != nil {
					return 0, err
				}
			}
			return exitOK, nil
		},
	},
	{
		name: "audit inclusion-proof", synopsis: "--index I --size N", help: "print the RFC 6962 proof that record I is in the log of size N",
		flags: func(fs *flag.FlagSet) {
			fs.Uint64("index", 0, "record index")
			fs.Uint64("size", 0, "tree size, at most the latest checkpoint's (required)")
		},
		run: func(e *env, fs *flag.FlagSet, _ []string) (int, error) {
			p, err := e.c.InclusionProof(e.ctx, uintFlag(fs, "index"), uintFlag(fs, "size"))
			if err != nil {
				return 0, err
			}
			return exitOK, e.out(p)
		},
	},
	{
		name: "audit consistency-proof", synopsis: "--old N --size M", help: "print the RFC 6962 proof that the log of size N is a prefix of the log of size M",
		flags: func(fs *flag.FlagSet) {
			fs.Uint64("old", 0, "older tree size")
			fs.Uint64("size", 0, "newer tree size (required)")
		},
		run: func(e *env, fs *flag.FlagSet, _ []string) (int, error) {
			p, err := e.c.ConsistencyProof(e.ctx, uintFlag(fs, "old"), uintFlag(fs, "size"))
			if err != nil {
				return 0, err
			}
			return exitOK, e.out(p)
		},
	},
	{
		name: "encapsulate", synopsis: "NAME [--version N|primary] [--shared-secret-file FILE]",
		help: "encapsulate locally to a served ML-KEM public key: prints the ciphertext (for decapsulate) and the shared secret", nargs: 1,
		flags: func(fs *flag.FlagSet) {
			fs.String("version", "primary", "version number or primary")
			fs.String("shared-secret-file", "", "write the raw shared secret to this file (0600) instead of printing it")
		},
		run: encapsulate,
	},
	{
		name: "he fetch", synopsis: "NAME [--version N|primary] --dir DIR --identity-key-file FILE [--fetch-identity]",
		help: "download a ckks/bgv version's public and evaluation keys to DIR: the signed manifest is checked against the pinned identity key and every blob against its digest; blobs already in DIR are kept, a partial one resumes", nargs: 1,
		flags: func(fs *flag.FlagSet) {
			fs.String("version", "primary", "version number or primary")
			fs.String("dir", "", "directory to write (required); blobs are named by their sha256")
			fs.String("identity-key-file", "", "the service's identity public key, base64 (required)")
			fs.Bool("fetch-identity", false, "if the identity key file does not exist, fetch the key from the server once and pin it there")
		},
		run: heFetch,
	},
}

var heCommands = []command{
	{
		name: "he encrypt", synopsis: "NAME|--key NAME [--version N|primary] [--in FILE] [--identity-key-file FILE] [--cache-dir DIR]", optArg: true,
		help: "encrypt a JSON array of numbers (stdin, or --in) locally under a ckks key's verified public key and have kmsd attest it as your input (an encryptor token: kmsd decrypts, and kmsd-mcp computes on, attested ciphertexts only); prints the ciphertext envelope with its attestation (the key as --key NAME, the older form, still works)", nargs: 0,
		flags: func(fs *flag.FlagSet) {
			fs.String("key", "", "the ckks key's name, where it is not given as the argument (the older form)")
			fs.String("version", "primary", "version number or primary")
			fs.String("in", "-", "file holding the values: a JSON array, or numbers separated by spaces, commas or newlines (- for stdin)")
			fs.String("identity-key-file", "", "the pinned identity public key (env KMS_IDENTITY_KEY_FILE); empty: the key kmsd serves over the TLS connection")
			fs.String("cache-dir", "", "where verified public keys are kept by digest (default: the user cache dir, kmsctl/hekeys)")
		},
		run: heEncrypt,
	},
	{
		name: "he decrypt", synopsis: "[--in FILE] [--identity-key-file FILE] [--cache-dir DIR] [--requester-key FILE]",
		help: "decrypt an attested ciphertext envelope (stdin, or --in) through kmsd (decryptor or admin token); prints the JSON array of the slots in use, ckks values after noise flooding, rounded to the precision kmsd kept. A threshold key's ciphertext is decrypted here: kmsd gathers t parties' partial decryptions towards a key kmsctl makes for the call, and only kmsctl sees the values", nargs: 0,
		flags: func(fs *flag.FlagSet) {
			fs.String("in", "-", "file holding the envelope (- for stdin)")
			fs.String("identity-key-file", "", "threshold keys: the pinned identity public key the key's manifest is checked with (env KMS_IDENTITY_KEY_FILE); empty: the key kmsd serves over the TLS connection")
			fs.String("cache-dir", "", "threshold keys: where verified keys are kept by digest (default: the user cache dir, kmsctl/hekeys)")
			fs.String("requester-key", "", "threshold keys whose policy names requesters: the file of your requester private key (kmsctl he requester-key), which signs the request")
		},
		run: func(e *env, fs *flag.FlagSet, _ []string) (int, error) {
			b, err := readInput(str(fs, "in"), "in")
			if err != nil {
				return 0, err
			}
			envl, err := hekeys.ParseEnvelope(b)
			if err != nil {
				return 0, usageError{err.Error()}
			}
			if k, err := e.c.GetKey(e.ctx, envl.Key); err == nil && k.Policy.Threshold != nil {
				f, err := e.fetcher(fs)
				if err != nil {
					return 0, err
				}
				keys, err := f.FetchPublic(e.ctx, envl.Key, envl.Version)
				if err != nil {
					return 0, err
				}
				priv, index, err := requesterFor(str(fs, "requester-key"), k.Policy.Threshold.Requesters)
				if err != nil {
					return 0, err
				}
				pt, err := hekeys.ThresholdDecryptAs(e.ctx, e.c, keys, envl, priv, index)
				if err != nil {
					return 0, err
				}
				if pt.Integers != nil {
					return exitOK, printJSONLine(e.stdout, pt.Integers)
				}
				return exitOK, printJSONLine(e.stdout, pt.Values)
			}
			vals, err := hekeys.Decrypt(e.ctx, e.c, envl)
			if err != nil {
				return 0, err
			}
			return exitOK, printJSONLine(e.stdout, vals)
		},
	},
	{
		name: "he requester-key", synopsis: "--out FILE",
		help: "make an ML-DSA-65 key pair for requesting decryptions of threshold keys: writes the private key to FILE (0600, base64) and prints the public key (base64) for the key's policy.threshold.requesters", nargs: 0,
		flags: func(fs *flag.FlagSet) {
			fs.String("out", "", "file to write the private key to (required; not overwritten)")
		},
		run: func(e *env, fs *flag.FlagSet, _ []string) (int, error) {
			out := str(fs, "out")
			if out == "" {
				return 0, usageError{"--out FILE is required"}
			}
			pub, priv, err := mldsa65.GenerateKey(rand.Reader)
			if err != nil {
				return 0, err
			}
			pb, _ := pub.MarshalBinary()
			sb, _ := priv.MarshalBinary()
			f, err := os.OpenFile(out, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
			if err != nil {
				return 0, usageError{fmt.Sprintf("--out: %v", err)}
			}
			if _, err := f.WriteString(base64.StdEncoding.EncodeToString(sb) + "\n"); err != nil {
				f.Close()
				return 0, err
			}
			if err := f.Close(); err != nil {
				return 0, err
			}
			return exitOK, printJSONLine(e.stdout, map[string]string{"public_key": base64.StdEncoding.EncodeToString(pb), "private_key_file": out})
		},
	},
	{
		name: "he rekey", synopsis: "[--to N|primary] [--in FILE] [--identity-key-file FILE] [--cache-dir DIR]",
		help: "re-key an attested ciphertext envelope (stdin, or --in) of an earlier version of its key into a later one without decrypting it: kmsctl fetches the switching key an administrator had kmsd issue (POST /v1/keys/NAME/versions/V/switching-keys; refused below min_decryption_version or towards a version that is not enabled), applies it locally and has kmsd attest the result as op rekey (an evaluator token); prints the new envelope", nargs: 0,
		flags: func(fs *flag.FlagSet) {
			fs.String("to", "primary", "the later version to re-key into")
			fs.String("in", "-", "file holding the envelope (- for stdin)")
			fs.String("identity-key-file", "", "the pinned identity public key (env KMS_IDENTITY_KEY_FILE); empty: the key kmsd serves over the TLS connection")
			fs.String("cache-dir", "", "where verified keys are kept by digest (default: the user cache dir, kmsctl/hekeys)")
		},
		run: heRekey,
	},
}

func init() {
	commands = append(commands, moreCommands...)
	commands = append(commands, heCommands...)
}

// readInput reads a file, or stdin for "-"; a file that cannot be read is
// the user's error (exit 2).
func readInput(path, flagName string) ([]byte, error) {
	var b []byte
	var err error
	if path == "-" || path == "" {
		b, err = io.ReadAll(os.Stdin)
	} else {
		b, err = os.ReadFile(path)
	}
	if err != nil {
		return nil, usageError{fmt.Sprintf("--%s: %v", flagName, err)}
	}
	return b, nil
}

// parseValues reads numbers as a JSON array or separated by spaces, commas
// or newlines.
func parseValues(b []byte) ([]float64, error) {
	text := strings.TrimSpace(string(b))
	var vals []float64
	if strings.HasPrefix(text, "[") {
		if err := json.Unmarshal([]byte(text), &vals); err != nil {
			return nil, usageError{"the values are not a JSON array of numbers: " + err.Error()}
		}
	} else {
		for _, f := range strings.FieldsFunc(text, func(r rune) bool { return r == ',' || r == ' ' || r == '\n' || r == '\t' || r == '\r' }) {
			v, err := strconv.ParseFloat(f, 64)
			if err != nil {
				return nil, usageError{fmt.Sprintf("%q is not a number", f)}
			}
			vals = append(vals, v)
		}
	}
	if len(vals) == 0 {
		return nil, usageError{"no values to encrypt"}
	}
	for _, v := range vals {
		if math.IsNaN(v) || math.IsInf(v, 0) {
			return nil, usageError{"values must be finite numbers"}
		}
	}
	return vals, nil
}

func heEncrypt(e *env, fs *flag.FlagSet, args []string) (int, error) {
	name := str(fs, "key")
	if len(args) == 1 {
		if name != "" && name != args[0] {
			return 0, usageError{fmt.Sprintf("the key is %q or %q? give it once, as the argument", args[0], name)}
		}
		name = args[0]
	}
	if name == "" {
		return 0, usageError{"name the ckks key: kmsctl he encrypt NAME"}
	}
	v, err := parseVersion(str(fs, "version"), true)
	if err != nil {
		return 0, err
	}
	b, err := readInput(str(fs, "in"), "in")
	if err != nil {
		return 0, err
	}
	vals, err := parseValues(b)
	if err != nil {
		return 0, err
	}
	f, err := e.fetcher(fs)
	if err != nil {
		return 0, err
	}
	keys, err := f.FetchPublic(e.ctx, name, v)
	if err != nil {
		return 0, err
	}
	envl, err := keys.Encrypt(vals)
	if err != nil {
		return 0, usageError{err.Error()}
	}
	if err := hekeys.AttestInput(e.ctx, e.c, envl); err != nil {
		return 0, err
	}
	return exitOK, printJSONLine(e.stdout, envl)
}

// printJSONLine prints v as one line of JSON (envelopes and value arrays
// go to other programs, whatever -o says).
func printJSONLine(w io.Writer, v any) error {
	return json.NewEncoder(w).Encode(v)
}

func uintFlag(fs *flag.FlagSet, name string) uint64 {
	v, _ := fs.Lookup(name).Value.(flag.Getter).Get().(uint64)
	return v
}

var kemSchemes = map[string]kem.Scheme{
	"ml-kem-512": mlkem512.Scheme(), "ml-kem-768": mlkem768.Scheme(), "ml-kem-1024": mlkem1024.Scheme(),
}

func encapsulate(e *env, fs *flag.FlagSet, args []string) (int, error) {
	v, err := parseVersion(str(fs, "version"), true)
	if err != nil {
		return 0, err
	}
	pk, err := e.c.PublicKey(e.ctx, args[0], v)
	if err != nil {
		return 0, err
	}
	scheme, ok := kemSchemes[pk.Kind]
	if !ok {
		return 0, usageError{fmt.Sprintf("%s is a %s key; encapsulate needs an ML-KEM key", args[0], pk.Kind)}
	}
	pub, err := scheme.UnmarshalBinaryPublicKey(pk.PublicKey)
	if err != nil {
		return 0, fmt.Errorf("the server's public key: %w", err)
	}
	ct, ss, err := scheme.Encapsulate(pub)
	if err != nil {
		return 0, err
	}
	out := map[string]any{"name": pk.Name, "version": pk.Version, "ciphertext": base64.StdEncoding.EncodeToString(ct)}
	if f := str(fs, "shared-secret-file"); f != "" {
		if err := writeFileAtomic(f, ss, 0o600); err != nil {
			return 0, err
		}
	} else {
		out["shared_secret"] = base64.StdEncoding.EncodeToString(ss)
	}
	return exitOK, e.out(out)
}

func heFetch(e *env, fs *flag.FlagSet, args []string) (int, error) {
	v, err := parseVersion(str(fs, "version"), true)
	if err != nil {
		return 0, err
	}
	dir := str(fs, "dir")
	if dir == "" {
		return 0, usageError{"--dir is required"}
	}
	pub, err := readIdentity(e, fs)
	if err != nil {
		return 0, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return 0, usageError{err.Error()}
	}
	// The same transport as every other command (TLS, HTTP/2), without the
	// client's overall timeout: see below.
	hc := *e.c.HTTPClient()
	hc.Timeout = 0
	f := &hekeys.Fetcher{BaseURL: e.g.url, Token: e.g.token, IdentityKey: pub, CacheDir: dir, HTTP: &hc, Progress: bar(e, "MiB")}
	// Like the wait for an operation, a download is not bounded by
	// --timeout: a logN 16 keyset is gigabytes; Ctrl-C stops it and the
	// next run resumes.
	m, err := f.Download(context.WithoutCancel(e.ctx), args[0], v)
	if err != nil {
		return 0, err
	}
	var total int64
	for _, b := range m.Blobs() {
		total += b.Size
	}
	return exitOK, e.out(map[string]any{"name": m.Key, "version": m.Version, "kind": m.Kind, "params_id": m.ParamsID,
		"dir": dir, "manifest": filepath.Join(dir, "manifest-"+strconv.FormatUint(m.Version, 10)+".json"),
		"blobs": len(m.Blobs()), "bytes": total})
}

// bar draws a progress bar of bytes on stderr, at most every 100 ms.
func bar(e *env, unit string) func(done, total int64) {
	var last time.Time
	return func(done, total int64) {
		if done < total && time.Since(last) < 100*time.Millisecond {
			return
		}
		last = time.Now()
		const width = 30
		filled := 0
		if total > 0 {
			filled = int(width * done / total)
		}
		fmt.Fprintf(e.stderr, "\r[%s%s] %d/%d %s", strings.Repeat("#", filled), strings.Repeat(" ", width-filled), done>>20, total>>20, unit)
		if done >= total {
			fmt.Fprintln(e.stderr)
		}
	}
}

// writeFileAtomic writes data to path (a file error is the user's: exit 2).
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	if err := fileutil.WriteAtomic(path, data, mode); err != nil {
		return usageError{err.Error()}
	}
	return nil
}

// writeFileWith writes what fill produces to path through a temporary file
// beside it, renamed into place only when fill succeeded.
func writeFileWith(path string, mode os.FileMode, fill func(io.Writer) error) error {
	var buf bytes.Buffer
	if err := fill(&buf); err != nil {
		return err
	}
	return writeFileAtomic(path, buf.Bytes(), mode)
}

// fetcher is an SDK fetcher for e's kmsd and token, with the identity key
// of --identity-key-file (or KMS_IDENTITY_KEY_FILE, or the one kmsd serves
// over the TLS connection) and the --cache-dir.
func (e *env) fetcher(fs *flag.FlagSet) (*hekeys.Fetcher, error) {
	var pub []byte
	idFile := str(fs, "identity-key-file")
	if idFile == "" {
		idFile = e.getenv("KMS_IDENTITY_KEY_FILE")
	}
	if idFile != "" {
		var err error
		if pub, err = readIdentityFile(idFile); err != nil {
			return nil, err
		}
	} else {
		id, err := e.c.Identity(e.ctx)
		if err != nil {
			return nil, err
		}
		pub = id.PublicKey
	}
	cache := str(fs, "cache-dir")
	if cache == "" {
		base, err := os.UserCacheDir()
		if err != nil {
			base = os.TempDir()
		}
		cache = filepath.Join(base, "kmsctl", "hekeys")
	}
	return &hekeys.Fetcher{BaseURL: e.g.url, Token: e.g.token, IdentityKey: pub, CacheDir: cache, HTTP: e.c.HTTPClient()}, nil
}

// heRekey re-keys an envelope into a later version of its key.
func heRekey(e *env, fs *flag.FlagSet, _ []string) (int, error) {
	to, err := parseVersion(str(fs, "to"), true)
	if err != nil {
		return 0, err
	}
	b, err := readInput(str(fs, "in"), "in")
	if err != nil {
		return 0, err
	}
	in, err := hekeys.ParseEnvelope(b)
	if err != nil {
		return 0, usageError{err.Error()}
	}
	f, err := e.fetcher(fs)
	if err != nil {
		return 0, err
	}
	from, err := f.FetchPublic(e.ctx, in.Key, in.Version)
	if err != nil {
		return 0, err
	}
	target, err := f.Manifest(e.ctx, in.Key, to)
	if err != nil {
		return 0, err
	}
	if target.Version <= in.Version {
		return 0, usageError{fmt.Sprintf("the ciphertext is under version %d; re-keying goes to a later version (--to %d)", in.Version, target.Version)}
	}
	swk, err := f.SwitchingKey(e.ctx, from, target.Version, false)
	if err != nil {
		return 0, err
	}
	out, err := hekeys.Rekey(from, target, swk, in)
	if err != nil {
		return 0, usageError{err.Error()}
	}
	if err := hekeys.AttestEvaluation(e.ctx, e.c, out, "rekey", []*client.Envelope{in}, 1, 1); err != nil {
		return 0, err
	}
	return exitOK, printJSONLine(e.stdout, out)
}

// requesterFor reads a requester private key file and finds its place in
// a threshold key's requesters (nil, 0 when no file is given).
func requesterFor(file string, requesters []string) (*mldsa65.PrivateKey, int, error) {
	if file == "" {
		return nil, 0, nil
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, 0, usageError{fmt.Sprintf("--requester-key: %v", err)}
	}
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(b)))
	var priv mldsa65.PrivateKey
	if err != nil || priv.UnmarshalBinary(raw) != nil {
		return nil, 0, usageError{"--requester-key: not an ML-DSA-65 private key in base64 (kmsctl he requester-key makes one)"}
	}
	pb, _ := priv.Public().(*mldsa65.PublicKey).MarshalBinary()
	i := slices.Index(requesters, base64.StdEncoding.EncodeToString(pb))
	if i < 0 {
		return nil, 0, usageError{"--requester-key: its public key is not among the key's policy.threshold.requesters"}
	}
	return &priv, i, nil
}
