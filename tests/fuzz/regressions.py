"""Inputs a fuzzer (or the review of issue 17) found once, each with the bug it showed: tests/test_fuzz.py runs them
through their harness every time, and `make fuzz` seeds its corpus with them. Inputs are in the harness's format
(tests/fuzz/common.py: a mode byte, then segments)."""

from __future__ import annotations

REGRESSIONS: dict[str, list[tuple[str, bytes]]] = {}

REGRESSIONS['irc'] = [
    ("a remote user's DCC SEND size in superscript digits ('²'.isdigit(), int('²') raises)",
     b'\x00\x01\x00\x1bNICK alice\r\nUSER a 0'
     b' * :A\r\n\x00\x00\x19:srv 001 alice'
     b' :Welcome\r\n\x00\x00=:mallory!m'
     b'@h PRIVMSG alice :\x01DCC S'
     b'END f 3232235777 5000 \xc2\xb2'
     b'\x01\r\n',
     ),
    ("a remote user's DCC SEND port in superscript digits ('²'.isdigit(), int('²') raises)",
     b'\x00\x01\x00\x1bNICK alice\r\nUSER a 0'
     b' * :A\r\n\x00\x00\x19:srv 001 alice'
     b' :Welcome\r\n\x00\x00<:mallory!m'
     b'@h PRIVMSG alice :\x01DCC S'
     b'END f 3232235777 \xc2\xb2 100\x01'
     b'\r\n',
     ),
    ("a remote user's DCC SEND address in superscript digits ('²'.isdigit(), int('²') raises)",
     b'\x00\x01\x00\x1bNICK alice\r\nUSER a 0'
     b' * :A\r\n\x00\x00\x19:srv 001 alice'
     b' :Welcome\r\n\x00\x006:mallory!m'
     b'@h PRIVMSG alice :\x01DCC S'
     b'END f \xc2\xb2 5000 100\x01\r\n',
     ),
    ("a remote user's DCC RESUME position in superscript digits ('²'.isdigit(), int('²') raises)",
     b'\x00\x01\x00\x1bNICK alice\r\nUSER a 0'
     b' * :A\r\n\x00\x00\x19:srv 001 alice'
     b' :Welcome\r\n\x00\x004:mallory!m'
     b'@h PRIVMSG alice :\x01DCC R'
     b'ESUME f 5000 \xc2\xb2\x01\r\n',
     ),
    ("a remote user's DCC CHAT port in superscript digits ('²'.isdigit(), int('²') raises)",
     b'\x00\x01\x00\x1bNICK alice\r\nUSER a 0'
     b' * :A\r\n\x00\x00\x19:srv 001 alice'
     b' :Welcome\r\n\x00\x005:mallory!m'
     b'@h PRIVMSG alice :\x01DCC C'
     b'HAT chat \xc2\xb2 5000\x01\r\n',
     ),
    ("our user's DCC SEND size in superscript digits",
     b'\x00\x01\x00\x1bNICK alice\r\nUSER a 0'
     b' * :A\r\n\x00\x00\x19:srv 001 alice'
     b' :Welcome\r\n\x01\x00.PRIVMSG bo'
     b'b :\x01DCC SEND f 323223577'
     b'7 5000 \xc2\xb2\x01\r\n',
     ),
]

REGRESSIONS['msnp'] = [
    ('MSG payload length in superscript digits',
     b'\x00\x01\x003ANS 89 jujurius@msn.'
     b'com 1115371039.15845 170'
     b'69658\r\n\x00\x00,IRO 89 1 1 cec'
     b'ile260992@hotmail.com ch'
     b'oupi\r\n\x00\x00\x0bANS 89 OK\r\n\x00\x00#M'
     b'SG cecile260992@hotmail.'
     b'com x \xc2\xb2\r\n',
     ),
    ('an MSNSLP INVITE whose SessionID is superscript digits',
     b'\x00\x01\x003ANS 89 jujurius@msn.'
     b'com 1115371039.15845 170'
     b'69658\r\n\x00\x00,IRO 89 1 1 cec'
     b'ile260992@hotmail.com ch'
     b'oupi\r\n\x00\x00\x0bANS 89 OK\r\n\x01\x05WM'
     b'SG 200 D 1351\r\nMIME-Vers'
     b'ion: 1.0\r\nContent-Type: '
     b'application/x-msnmsgrp2p'
     b'\r\nP2P-Dest: cecile260992'
     b'@hotmail.com\r\n\r\n\x00\x00\x00\x00M\x00\x00\x00'
     b'\x00\x00\x00\x00\x00\x00\x00\x00\xb2\x04\x00\x00\x00\x00\x00\x00\xb2\x04\x00\x00\x00\x00\x00\x00'
     b'\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00INVITE M'
     b'SNMSGR:cecile260992@hotm'
     b'ail.com MSNSLP/1.0\r\nTo: '
     b'<msnmsgr:cecile260992@ho'
     b'tmail.com>\r\nFrom: <msnms'
     b'gr:jujurius@msn.com>\r\nVi'
     b'a: MSNSLP/1.0/TLP ;branc'
     b'h={33333333-4444-5555-66'
     b'66-777777777777}\r\nCSeq: '
     b'0\r\nCall-ID: {9A1B2C3D-00'
     b'00-4000-8000-00000000ABC'
     b'D}\r\nMax-Forwards: 0\r\nCon'
     b'tent-Type: application/x'
     b'-msnmsgr-sessionreqbody\r'
     b'\nContent-Length: 857\r\n\r\n'
     b'EUF-GUID: {5D3E02AB-6190'
     b'-11D3-BBBB-00C04F795683}'
     b'\r\nSessionID: \xc2\xb2\r\nAppID: '
     b'2\r\nContext: PgIAAAIAAAAK'
     b'AAAAAAAAAAAAAABhAC4AZQB4'
     b'AGUAAAAAAAAAAAAAAAAAAAAA'
     b'AAAAAAAAAAAAAAAAAAAAAAAA'
     b'AAAAAAAAAAAAAAAAAAAAAAAA'
     b'AAAAAAAAAAAAAAAAAAAAAAAA'
     b'AAAAAAAAAAAAAAAAAAAAAAAA'
     b'AAAAAAAAAAAAAAAAAAAAAAAA'
     b'AAAAAAAAAAAAAAAAAAAAAAAA'
     b'AAAAAAAAAAAAAAAAAAAAAAAA'
     b'AAAAAAAAAAAAAAAAAAAAAAAA'
     b'AAAAAAAAAAAAAAAAAAAAAAAA'
     b'AAAAAAAAAAAAAAAAAAAAAAAA'
     b'AAAAAAAAAAAAAAAAAAAAAAAA'
     b'AAAAAAAAAAAAAAAAAAAAAAAA'
     b'AAAAAAAAAAAAAAAAAAAAAAAA'
     b'AAAAAAAAAAAAAAAAAAAAAAAA'
     b'AAAAAAAAAAAAAAAAAAAAAAAA'
     b'AAAAAAAAAAAAAAAAAAAAAAAA'
     b'AAAAAAAAAAAAAAAAAAAAAAAA'
     b'AAAAAAAAAAAAAAAAAAAAAAAA'
     b'AAAAAAAAAAAAAAAAAAAAAAAA'
     b'AAAAAAAAAAAAAAAAAAAAAAAA'
     b'AAAAAAAAAAAAAAAAAAAAAAAA'
     b'AAAAAAAAAAAAAAAAAAAAAAAA'
     b'AAAAAAAAAAAAAAAAAAAAAAAA'
     b'AAAAAAAAAAAAAAAAAAAAAAAA'
     b'AAAAAAAAAAAAAAAAAAAAAAAA'
     b'AAAAAAAAAAAAAAAAAAAAAAAA'
     b'AAAAAAAAAAAAAAAAAAAAAAAA'
     b'AAAAAAAAAAAA////////////'
     b'////////////////////////'
     b'////AAAAAA==\r\n\r\n\x00\x00\x00\x00\x00\x00',
     ),
    ('MSNFTP FIL size in superscript digits',
     b'\x01\x01\x00\x0cVER MSNFTP\r\n\x00\x00\x0cVER M'
     b'SNFTP\r\n\x01\x00#USR cecile2609'
     b'92@hotmail.com 9911\r\n\x00\x00\x08'
     b'FIL \xc2\xb2\r\n',
     ),
]

REGRESSIONS['ymsg'] = [
    ('a file offer whose size is superscript digits (ours)',
     b'\x00\x01\x00\x14YMSG\x00\x10\x00\x00\x00\x00\x00L\x00\x00\x00\x00\x00\x00\x00\x00'
     b'\x00\x00\x14YMSG\x00\x10\x00\x00\x00\x00\x00L\x00\x00\x00\x01\x00\x00\x00\x00\x01'
     b'\x00#YMSG\x00\x10\x00\x00\x00\x0f\x00W\x00\x00\x00\x00\x00\x00\x00\x001\xc0'
     b'\x80alice_1970\xc0\x80\x00\x00@YMSG\x00\x10\x00\x00'
     b'\x00,\x00W\x00\x00\x00\x01Z\x1e+<1\xc0\x80alice_197'
     b'0\xc0\x8094\xc0\x80AbCdEfGhIjKlMnOp\xc0'
     b'\x8013\xc0\x802\xc0\x80\x01\x00\x94YMSG\x00\x10\x00\x00\x00\x80\x00T\x00'
     b'\x00\x00\x00Z\x1e+<277\xc0\x80v=1&n=...\xc0\x802'
     b'78\xc0\x80z=...\xc0\x80307\xc0\x80abc\xc0\x800\xc0\x80'
     b'alice_1970\xc0\x802\xc0\x80alice_197'
     b'0\xc0\x802\xc0\x801\xc0\x801\xc0\x80alice_1970\xc0\x80'
     b'244\xc0\x804194239\xc0\x8098\xc0\x80us\xc0\x8013'
     b'5\xc0\x809.0.0.2162\xc0\x80\x00\x00yYMSG\x00\x10'
     b'\x00\x00\x00e\x00U\x00\x00\x00\x00Z\x1e+<89\xc0\x80alice_'
     b'1970\xc0\x8059\xc0\x80Y\tv=1&n=...\xc0\x805'
     b'9\xc0\x80T\tz=...\xc0\x803\xc0\x80alice_197'
     b'0\xc0\x8090\xc0\x801\xc0\x80100\xc0\x800\xc0\x80101\xc0\x80\xc0'
     b'\x80102\xc0\x80\xc0\x8093\xc0\x8086400\xc0\x80\x00\x00bYM'
     b'SG\x00\x10\x00\x00\x00N\x00\x01\x00\x00\x00\x00Z\x1e+<0\xc0\x80ali'
     b'ce_1970\xc0\x801\xc0\x80alice_1970\xc0\x80'
     b'8\xc0\x801\xc0\x807\xc0\x80bob.smith\xc0\x8010\xc0\x80'
     b'0\xc0\x8011\xc0\x800\xc0\x8017\xc0\x800\xc0\x8013\xc0\x801\xc0\x80'
     b'\x01\x00PYMSG\x00\x10\x00\x00\x00<\x00\xdc\x00\x00\x00\x00Z\x1e+<1'
     b'\xc0\x80alice_1970\xc0\x805\xc0\x80bob\xc0\x8026'
     b'5\xc0\x80tid1\xc0\x80222\xc0\x801\xc0\x8027\xc0\x80a.e'
     b'xe\xc0\x8028\xc0\x80\xb2\xc0\x80',
     ),
    ('a file offer whose size is superscript digits (from outside)',
     b'\x00\x01\x00\x14YMSG\x00\x10\x00\x00\x00\x00\x00L\x00\x00\x00\x00\x00\x00\x00\x00'
     b'\x00\x00\x14YMSG\x00\x10\x00\x00\x00\x00\x00L\x00\x00\x00\x01\x00\x00\x00\x00\x01'
     b'\x00#YMSG\x00\x10\x00\x00\x00\x0f\x00W\x00\x00\x00\x00\x00\x00\x00\x001\xc0'
     b'\x80alice_1970\xc0\x80\x00\x00@YMSG\x00\x10\x00\x00'
     b'\x00,\x00W\x00\x00\x00\x01Z\x1e+<1\xc0\x80alice_197'
     b'0\xc0\x8094\xc0\x80AbCdEfGhIjKlMnOp\xc0'
     b'\x8013\xc0\x802\xc0\x80\x01\x00\x94YMSG\x00\x10\x00\x00\x00\x80\x00T\x00'
     b'\x00\x00\x00Z\x1e+<277\xc0\x80v=1&n=...\xc0\x802'
     b'78\xc0\x80z=...\xc0\x80307\xc0\x80abc\xc0\x800\xc0\x80'
     b'alice_1970\xc0\x802\xc0\x80alice_197'
     b'0\xc0\x802\xc0\x801\xc0\x801\xc0\x80alice_1970\xc0\x80'
     b'244\xc0\x804194239\xc0\x8098\xc0\x80us\xc0\x8013'
     b'5\xc0\x809.0.0.2162\xc0\x80\x00\x00yYMSG\x00\x10'
     b'\x00\x00\x00e\x00U\x00\x00\x00\x00Z\x1e+<89\xc0\x80alice_'
     b'1970\xc0\x8059\xc0\x80Y\tv=1&n=...\xc0\x805'
     b'9\xc0\x80T\tz=...\xc0\x803\xc0\x80alice_197'
     b'0\xc0\x8090\xc0\x801\xc0\x80100\xc0\x800\xc0\x80101\xc0\x80\xc0'
     b'\x80102\xc0\x80\xc0\x8093\xc0\x8086400\xc0\x80\x00\x00bYM'
     b'SG\x00\x10\x00\x00\x00N\x00\x01\x00\x00\x00\x00Z\x1e+<0\xc0\x80ali'
     b'ce_1970\xc0\x801\xc0\x80alice_1970\xc0\x80'
     b'8\xc0\x801\xc0\x807\xc0\x80bob.smith\xc0\x8010\xc0\x80'
     b'0\xc0\x8011\xc0\x800\xc0\x8017\xc0\x800\xc0\x8013\xc0\x801\xc0\x80'
     b'\x00\x00PYMSG\x00\x10\x00\x00\x00<\x00\xdc\x00\x00\x00\x00Z\x1e+<4'
     b'\xc0\x80bob\xc0\x805\xc0\x80alice_1970\xc0\x8026'
     b'5\xc0\x80tid2\xc0\x80222\xc0\x801\xc0\x8027\xc0\x80a.e'
     b'xe\xc0\x8028\xc0\x80\xb2\xc0\x80',
     ),
]

REGRESSIONS['sip'] = [
    ('an SDP file-selector size in superscript digits',
     b'\x00\x01\x01\xbfINVITE sip:bob@b.exa'
     b'mple SIP/2.0\r\nVia: SIP/2'
     b'.0/TCP 10.0.0.7;branch=z'
     b'9hG4bK1\r\nFrom: <sip:alic'
     b'e@a.example>;tag=1\r\nTo: '
     b'<sip:bob@b.example>\r\nCal'
     b'l-ID: c1\r\nCSeq: 1 INVITE'
     b'\r\nContent-Type: applicat'
     b'ion/sdp\r\nContent-Length:'
     b' 227\r\n\r\nv=0\r\no=a 1 1 IN '
     b'IP4 10.0.0.7\r\ns=-\r\nc=IN '
     b'IP4 10.0.0.7\r\nt=0 0\r\nm=m'
     b'essage 7654 TCP/MSRP *\r\n'
     b'a=sendonly\r\na=accept-typ'
     b'es:*\r\na=path:msrp://10.0'
     b'.0.7:7654/jshA7we;tcp\r\na'
     b'=file-selector:name:"a.e'
     b'xe" type:application/oct'
     b'et-stream size:\xc2\xb2\r\n',
     ),
    ('an SDP media port in superscript digits',
     b'\x00\x00\x01\xbdINVITE sip:bob@b.exa'
     b'mple SIP/2.0\r\nVia: SIP/2'
     b'.0/TCP 10.0.0.7;branch=z'
     b'9hG4bK1\r\nFrom: <sip:alic'
     b'e@a.example>;tag=1\r\nTo: '
     b'<sip:bob@b.example>\r\nCal'
     b'l-ID: c1\r\nCSeq: 1 INVITE'
     b'\r\nContent-Type: applicat'
     b'ion/sdp\r\nContent-Length:'
     b' 225\r\n\r\nv=0\r\no=a 1 1 IN '
     b'IP4 10.0.0.7\r\ns=-\r\nc=IN '
     b'IP4 10.0.0.7\r\nt=0 0\r\nm=m'
     b'essage \xc2\xb2 TCP/MSRP *\r\na='
     b'sendonly\r\na=accept-types'
     b':*\r\na=path:msrp://10.0.0'
     b'.7:7654/jshA7we;tcp\r\na=f'
     b'ile-selector:name:"a.exe'
     b'" type:application/octet'
     b'-stream size:\xc2\xb2\r\n',
     ),
    ('an MSRP path port in superscript digits',
     b'\x00\x01\x01\xbdINVITE sip:bob@b.exa'
     b'mple SIP/2.0\r\nVia: SIP/2'
     b'.0/TCP 10.0.0.7;branch=z'
     b'9hG4bK1\r\nFrom: <sip:alic'
     b'e@a.example>;tag=1\r\nTo: '
     b'<sip:bob@b.example>\r\nCal'
     b'l-ID: c1\r\nCSeq: 1 INVITE'
     b'\r\nContent-Type: applicat'
     b'ion/sdp\r\nContent-Length:'
     b' 225\r\n\r\nv=0\r\no=a 1 1 IN '
     b'IP4 10.0.0.7\r\ns=-\r\nc=IN '
     b'IP4 10.0.0.7\r\nt=0 0\r\nm=m'
     b'essage 7654 TCP/MSRP *\r\n'
     b'a=sendonly\r\na=accept-typ'
     b'es:*\r\na=path:msrp://10.0'
     b'.0.7:\xc2\xb2/jshA7we;tcp\r\na=f'
     b'ile-selector:name:"a.exe'
     b'" type:application/octet'
     b'-stream size:10\r\n',
     ),
    ('a CSeq number in superscript digits',
     b'\x00\x00\x01CMESSAGE sip:bob@b.ex'
     b'ample SIP/2.0\r\nVia: SIP/'
     b'2.0/TCP 10.0.0.7;branch='
     b'z9hG4bK-7-1\r\nVia: SIP/2.'
     b'0/TCP 10.0.0.8;branch=z9'
     b'hG4bK-8-1\r\nMax-Forwards:'
     b' 70\r\nFrom: <sip:alice@a.'
     b'example>;tag=49583\r\nTo: '
     b'<sip:bob@b.example>\r\nCal'
     b'l-ID: asd88asd77a-1@10.0'
     b'.0.7\r\nCSeq: \xc2\xb2 MESSAGE\r\n'
     b'Content-Type: text/plain'
     b';charset=UTF-8\r\nContent-'
     b'Length: 2\r\n\r\nhi',
     ),
    ('a Content-Length in superscript digits',
     b'\x01\x01\x01CMESSAGE sip:bob@b.ex'
     b'ample SIP/2.0\r\nVia: SIP/'
     b'2.0/TCP 10.0.0.7;branch='
     b'z9hG4bK-7-1\r\nVia: SIP/2.'
     b'0/TCP 10.0.0.8;branch=z9'
     b'hG4bK-8-1\r\nMax-Forwards:'
     b' 70\r\nFrom: <sip:alice@a.'
     b'example>;tag=49583\r\nTo: '
     b'<sip:bob@b.example>\r\nCal'
     b'l-ID: asd88asd77a-1@10.0'
     b'.0.7\r\nCSeq: 1 MESSAGE\r\nC'
     b'ontent-Type: text/plain;'
     b'charset=UTF-8\r\nContent-L'
     b'ength: \xc2\xb2\r\n\r\nhi',
     ),
    ('a charset name with a NUL',
     b'\x00\x01\x01DMESSAGE sip:bob@b.ex'
     b'ample SIP/2.0\r\nVia: SIP/'
     b'2.0/TCP 10.0.0.7;branch='
     b'z9hG4bK-7-1\r\nVia: SIP/2.'
     b'0/TCP 10.0.0.8;branch=z9'
     b'hG4bK-8-1\r\nMax-Forwards:'
     b' 70\r\nFrom: <sip:alice@a.'
     b'example>;tag=49583\r\nTo: '
     b'<sip:bob@b.example>\r\nCal'
     b'l-ID: asd88asd77a-1@10.0'
     b'.0.7\r\nCSeq: 1 MESSAGE\r\nC'
     b'ontent-Type: text/plain;'
     b'charset="utf\x008"\r\nContent'
     b'-Length: 2\r\n\r\nhi\x00\x01DMESSA'
     b'GE sip:bob@b.example SIP'
     b'/2.0\r\nVia: SIP/2.0/TCP 1'
     b'0.0.0.7;branch=z9hG4bK-7'
     b'-1\r\nVia: SIP/2.0/TCP 10.'
     b'0.0.8;branch=z9hG4bK-8-1'
     b'\r\nMax-Forwards: 70\r\nFrom'
     b': <sip:alice@a.example>;'
     b'tag=49583\r\nTo: <sip:bob@'
     b'b.example>\r\nCall-ID: asd'
     b'88asd77a-1@10.0.0.7\r\nCSe'
     b'q: 1 MESSAGE\r\nContent-Ty'
     b'pe: text/plain;charset="'
     b'utf\x008"\r\nContent-Length: '
     b'2\r\n\r\nhi',
     ),
]
